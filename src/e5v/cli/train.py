"""``e5v train`` and ``e5v merge``. Nothing heavy is imported until a verb runs."""
from __future__ import annotations


import json
import logging
import os


def add_parsers(sub) -> None:
    from ..train.config import add_config_flags

    p = sub.add_parser("train", help="fine-tune a backbone contrastively (E5-V's text recipe; images on any side)",
                       description="LoRA + InfoNCE with hard negatives over the global batch (GradCache), the "
                                   "official run's settings by default. Data: text triplets (csv/jsonl/parquet), "
                                   "JSONL records with query/positive/negative sides (text, image or both) or "
                                   "MMEB-train columns (image paths relative to the file or --image-root; "
                                   "--anyres-max-tiles, --image-max-pixels, --max-pixels, --alpha as when "
                                   "serving); several files separated by commas (--data-weights, "
                                   "--single-source-batches). Every setting is a flag and a key of the "
                                   "--config file (YAML or JSON); flags override the file. Multi-GPU: launch "
                                   "with torchrun, accelerate launch (configs/accelerate/) or deepspeed "
                                   "--no_local_rank --module e5v.cli; "
                                   "--deepspeed CONFIG (ZeRO-2/3) or --fsdp shard the work. Rerun the same "
                                   "command to resume.")
    add_config_flags(p)
    p.set_defaults(run=run_train)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base checkpoint",
                       description="Write a full checkpoint (base + adapter merged) that E5V.from_pretrained loads.")
    m.add_argument("--model", required=True, help="base checkpoint (hub id or directory)")
    m.add_argument("--adapter", required=True, help="adapter directory (e.g. OUTPUT_DIR/adapter)")
    m.add_argument("--out", required=True, help="new directory for the merged checkpoint")
    m.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32")
    m.set_defaults(run=run_merge)


def run_train(args) -> int:
    import torch

    from ..train.config import config_from_args
    from ..train.loss import dist_ready
    from ..train.trainer import train

    cfg = config_from_args(args)
    logging.getLogger("e5v.train").setLevel(logging.INFO)  # per-step loss, lr, grad-norm, sentences/s
    adapter = train(cfg)
    if dist_ready():
        # without this, gloo's worker threads can abort the finished process at interpreter exit (SIGABRT)
        torch.distributed.destroy_process_group()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        last = None
        log_path = adapter.parent / "log.jsonl"
        if log_path.exists():
            lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
            last = json.loads(lines[-1]) if lines else None
        summary = f"; step {last['step']} loss {last['loss']:.4f}" if last else ""
        print(f"trained {cfg.model} on {cfg.data}{summary}; adapter -> {adapter}")
    return 0


def run_merge(args) -> int:
    from ..train.merge import merge

    out = merge(args.model, args.adapter, args.out, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0

