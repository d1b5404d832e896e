"""``e5v bench``: the official E5-V recipe against e5v's engine on the real architecture (random weights, offline).
Nothing heavy is imported until the verb runs."""
from __future__ import annotations

from pathlib import Path

from ..bench.model import CONFIG


def run_bench(args) -> int:
    from ..bench import run
    from ..errors import ConfigError

    if args.images < 2 or args.texts < 4:
        raise ConfigError("--images must be >= 2 and --texts >= 4")
    result = run(args)
    rows = result["rows"]
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if v is not None))
    for line in result["summary"]:
        print(f"- {line}")
    worst = min(r["min cosine"] for r in rows if r.get("min cosine") is not None and "capped" not in r["what"])
    print(f"bench: {len(rows)} measurements on {result['meta']['device_name']}; smallest cosine between the official "
          f"recipe and e5v: {worst:.6f}" + (f"; results -> {args.out}" if args.out else ""))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="measure the official recipe against e5v's engine (random weights, offline)",
                       description=__doc__.split("\n\n")[0] + " See docs/speed.md.")
    p.add_argument("--config", default=str(CONFIG),
                   help="LLaVA-NeXT config.json (default: llama3-llava-next-8b, shipped with e5v)")
    p.add_argument("--tiny", action="store_true", help="real image geometry and vocabulary, tiny widths (for CPU)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="compute precision of both paths: auto (as the engine: float16 on "
                                                    "GPU, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--attn", default="sdpa",
                   help="attention implementation of the model (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--images", type=int, default=64, help="images (COCO-like sizes, cycled)")
    p.add_argument("--texts", type=int, default=1024, help="texts (32-55 tokens with the prompt)")
    p.add_argument("--workers", type=int, default=4, help="preprocessing worker processes of the engine")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--anyres-max-tiles", type=int, default=1, help="AnyRes cap measured as the speed option")
    p.add_argument("--image-batches", default="1,8",
                   help="batch sizes of the official recipe for images, the first one its default (speed-ups are "
                        "against it); the engine is also measured at each, for the peak-memory comparison")
    p.add_argument("--text-batches", default="15,256", help="the same for texts (15: the official evaluation's)")
    p.add_argument("--variants", default="packed,grouped",
                   help="extra engine paths, comma-separated: packed (SDPA/eager block mask), grouped (one length "
                        "per batch), flex (packed under FlexAttention, compiled on first use: slow to start on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--markdown", type=Path, help="markdown table of the results")
    p.set_defaults(run=run_bench)
