"""Embedding speed: the official E5-V recipe against e5v's engine on the real llama3-llava-next-8b architecture
(random weights, built offline from configs/llama3-llava-next-8b/config.json), in one run on one device.

The measurement itself is ``e5v bench`` (src/e5v/bench.py); this script runs it with the settings of the
published figures. Extra arguments are passed on (``--help`` lists them).

GPU (one H100, about 3 minutes):  python benchmarks/embed_speed.py --out embed.json --markdown embed.md
CPU (tiny widths, real geometry): python benchmarks/embed_speed.py --tiny --device cpu --images 8 --texts 64
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from e5v.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
