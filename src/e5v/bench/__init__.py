"""``e5v bench``: the official E5-V recipe against e5v's engine, in one run, on one device.

The model is the real llama3-llava-next-8b architecture (``llama3-llava-next-8b/config.json`` in this package,
the one royokong/e5-v uses) with random weights: speed and memory do not depend on the weight values, and nothing
is downloaded. ``--tiny`` keeps the real image geometry (336-px CLIP-L/14 tiles, AnyRes pinpoints, 128,320
vocabulary) with a narrow, shallow network, so the whole benchmark runs on a CPU in seconds: the tests use it
to check that both paths run and agree, not their speed.

Measured (:mod:`e5v.bench.measure`, one function each): images/s on COCO-like sizes at full AnyRes (JPEG files in
memory, decoded by both paths), texts/s (32-55 tokens each with the prompt), tokens/s, peak accelerator memory,
image decoding + preprocessing rate (one process against worker processes), the smallest cosine between the two
paths' vectors for the same item, and the speed-up of the AnyRes cap. The official recipe
(:mod:`e5v.bench.official`) runs at its default batch (1 for images, 15 for texts) and at larger ones
(``--image-batches``, ``--text-batches``), and the engine at each of those too, so that peak memory is compared
batch for batch. Results are written after each row (:mod:`e5v.bench.report`: JSON and a markdown table, with a
summary against the targets), so a run cut short keeps what it measured.

The compute precision is the engine's: ``--dtype auto`` is fp16 on a GPU and fp32 on a CPU
(:func:`e5v.config.resolve_dtype`), for both paths.
"""
from __future__ import annotations


def batch_sizes(text: str, n: int) -> list[int]:
    """``"1,8"`` -> [1, 8], each at most ``n`` (the number of items), without repeats, in the given order."""
    from ..errors import ConfigError

    try:
        sizes = [min(int(v), n) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"batch sizes must be integers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be >= 1, not {text!r}")
    return list(dict.fromkeys(sizes))


def run(args) -> dict:
    """Every measurement in order (the parsed ``e5v bench`` arguments); returns the report (meta, rows, summary)."""
    import torch

    from ..config import resolve_device, resolve_dtype
    from . import measure

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    image_batches = batch_sizes(args.image_batches, args.images)
    text_batches = batch_sizes(args.text_batches, args.texts)
    names = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    s = measure.Session.start(args, device, dtype)
    try:
        measure.warm_up(s)
        full = measure.compare(s, "images", image_batches, names)
        measure.compare(s, "texts", text_batches, names)
        measure.preprocessing(s)
        measure.anyres_capped(s, full)
        if "flex" in names:
            measure.packed_flex(s)
    finally:
        s.engine.close()
    return s.report.as_dict()
