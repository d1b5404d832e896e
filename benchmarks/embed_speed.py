"""Embedding speed: the official E5-V recipe against e5v's engine on the real llama3-llava-next-8b architecture
(random weights, built offline from src/e5v/bench/llama3-llava-next-8b/config.json), in one run on one device.

The measurement itself is ``e5v bench`` (src/e5v/bench/); this script runs it without installing the package.
Arguments are passed on (``--help`` lists them); benchmarks/gpu_all.sh holds the ones of the GPU run.

GPU (one H100; gpu_all.sh gives it 300 s):  python benchmarks/embed_speed.py --out embed.json --markdown embed.md
CPU (tiny widths, real geometry; small official batches, since its logits over 128,320 words are fp32 there):
  python benchmarks/embed_speed.py --tiny --device cpu --images 8 --texts 64 --image-batches 1,2 --text-batches 15,32
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from e5v.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
