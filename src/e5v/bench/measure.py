"""The benchmark's measurements, one function each; every one adds its rows to the shared :class:`Session`'s
report. The order in which :func:`e5v.bench.run` calls them is the order of the rows."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import prompts
from .clock import Clock
from .report import Report

log = logging.getLogger(__name__)

UNBOUNDED = 1 << 40  # no token budget: batches of exactly max_batch_size items, as the official recipe's
#: the engine's extra paths (``--variants``): engine options and the note of their rows
VARIANTS = {"packed": ({"packing": True}, "one row, block-diagonal mask ({attn})"),
            "grouped": ({"group_lengths": True}, "one length per batch, no padding")}


@dataclass
class Session:
    """What the measurements share: the arguments, the model, the engine on it, the inputs, the clock, the report,
    and the official recipe's vectors and rows (``official[what][batch]``)."""

    args: Any
    backbone: Any
    engine: Any
    clock: Clock
    report: Report
    images: list[bytes]
    texts: list[str]
    image_items: list
    official: dict = field(default_factory=lambda: {"images": {}, "texts": {}})

    @classmethod
    def start(cls, args, device, dtype) -> "Session":
        """Builds the random model (the shipped architecture or ``args.config``), the inputs and the engine."""
        from ..encoder import E5V
        from ..items import Item
        from .inputs import make_images, make_texts
        from .model import build_backbone, build_config
        from .report import environment

        started = time.perf_counter()
        bb = build_backbone(build_config(args.config, tiny=args.tiny), device=device, dtype=dtype,
                            attn_implementation=args.attn)
        params = sum(p.numel() for p in bb.model.parameters())
        label = f"{Path(args.config).parent.name}{' (tiny widths)' if args.tiny else ''}, {params / 1e9:.3f} B params"
        report = Report(environment(device, dtype, args.attn, label), args.out, args.markdown)
        log.info("built %s on %s in %.1f s", label, device, time.perf_counter() - started)
        images = make_images(args.images)
        return cls(args, bb, E5V(bb, num_workers=args.workers, packing=False, max_batch_tokens=args.max_batch_tokens),
                   Clock(device), report, images, make_texts(args.texts, bb),
                   [Item(image=im, name=f"image {k}") for k, im in enumerate(images)])

    def inputs(self, what: str) -> tuple[list, str, dict]:
        """The engine's items, its prompt, and the official recipe's keyword for ``what`` (images or texts)."""
        if what == "images":
            return self.image_items, prompts.IMAGE_PROMPT, {"images": self.images}
        return self.texts, prompts.TEXT, {"texts": self.texts}

    def embed(self, items, prompt, **opts):
        """The engine's result for ``items`` with engine attributes ``opts`` set for this call only."""
        saved = {k: getattr(self.engine, k) for k in opts}
        try:
            for k, v in opts.items():
                setattr(self.engine, k, v)
            res = self.engine.embed(items, prompt=prompt)
        finally:
            for k, v in saved.items():
                setattr(self.engine, k, v)
        if res.skipped:
            raise RuntimeError(f"benchmark items were skipped: {res.skipped[:3]}")
        return res


def min_cosine(a, b) -> float:
    import numpy as np

    return float(np.min(np.sum(a * b, axis=1)))


def warm_up(s: Session) -> None:
    """Kernels, allocator, worker start-up: both paths once on a few items, not timed."""
    from .official import reference_embed

    reference_embed(s.backbone, images=s.images[:1], batch=1)
    reference_embed(s.backbone, texts=s.texts[:2], batch=2)
    s.embed(s.image_items[:2], prompts.IMAGE_PROMPT)
    s.embed(s.texts[:4], prompts.TEXT)


def official_recipe(s: Session, what: str, batch: int) -> dict:
    """The official recipe on all images or texts at ``batch``; its vectors are kept for the engine's rows."""
    from .official import reference_embed

    _, _, inputs = s.inputs(what)
    (vecs, tokens), sec, peak = s.clock(lambda: reference_embed(s.backbone, batch=batch, **inputs))
    n = len(tokens)
    note = (f"{tokens.sum() / n:.0f} tokens/image, decoding + preprocessing on the main process"
            if what == "images" else f"{tokens.sum() / n:.1f} tokens/text")
    row = s.report.add(what=what, path="official recipe", batch=batch, items=n, tokens=int(tokens.sum()),
                       **{"items/s": n / sec, "tokens/s": int(tokens.sum()) / sec, "peak GiB": peak, "note": note})
    s.official[what][batch] = (vecs, row)
    return row


def engine_path(s: Session, what: str, path: str, opts: dict, note: str):
    """One engine path on all images or texts: its speed against the official recipe's default batch (measured
    first), its peak memory against the official recipe's at the same batch, its smallest cosine to the official
    vectors. Returns the engine's result, the seconds and the row."""
    items, prompt, _ = s.inputs(what)
    res, sec, peak = s.clock(lambda: s.embed(items, prompt, **opts))
    ref_vecs, ref_row = next(iter(s.official[what].values()))
    rate = len(items) / sec
    note = f"{note}; {s.args.workers} workers; x{rate / ref_row['items/s']:.2f} vs official batch {ref_row['batch']}"
    batch = opts.get("max_batch_size", f"<= {s.args.max_batch_tokens} tok")
    same = s.official[what].get(batch)
    if same and peak is not None and same[1]["peak GiB"] is not None:
        note += f"; peak x{peak / same[1]['peak GiB']:.2f} of official at batch {batch}"
    return res, sec, s.report.add(what=what, path=path, batch=batch, items=len(items), tokens=int(res.tokens.sum()), **{
        "items/s": rate, "tokens/s": int(res.tokens.sum()) / sec, "peak GiB": peak,
        "min cosine": min_cosine(ref_vecs, res.vectors), "note": note})


def variants(names: list[str], attn: str) -> list[tuple[str, dict, str]]:
    """The engine's paths: its default, then each extra variant in ``names`` (packed, grouped) in that order."""
    out = [("e5v", {}, "sorted by length, token budget, padded")]
    for name in names:
        if name in VARIANTS:
            opts, note = VARIANTS[name]
            out.append((f"e5v {name}", opts, note.format(attn=attn)))
    return out


def compare(s: Session, what: str, batches: list[int], names: list[str]):
    """Images (full AnyRes) or texts: the official recipe at its default batch (``batches[0]``), the engine's
    paths, then both at every batch size (the peak-memory target compares them batch for batch). Returns the
    engine's default path's result and seconds."""
    official_recipe(s, what, batches[0])
    first = None
    for path, opts, note in variants(names, s.args.attn):
        res, sec, _ = engine_path(s, what, path, opts, note)
        first = first or (res, sec)
    for b in batches[1:]:
        official_recipe(s, what, b)
    for b in batches:
        engine_path(s, what, "e5v", {"max_batch_size": b, "max_batch_tokens": UNBOUNDED},
                    "same batch as the official recipe")
    return first


def preprocessing(s: Session) -> None:
    """Image decoding + preprocessing alone: one process against the engine's worker pool."""
    from ..workers import PreparePool

    items, workers = s.image_items, s.args.workers
    preparer = s.engine.preparer()
    _, s1, _ = s.clock(lambda: [preparer.prepare(it, prompts.IMAGE_PROMPT) for it in items])
    s.report.add(what="image preprocessing", path="1 process", items=len(items),
                 **{"items/s": len(items) / s1, "note": "JPEG decoding, checks, AnyRes tiles, tokens"})
    if workers > 0:
        pool = PreparePool(preparer.shippable(), workers)
        try:
            pool.collect(pool.submit(list(enumerate(items[:workers])), prompts.IMAGE_PROMPT))  # start-up
            _, sw, _ = s.clock(lambda: pool.collect(pool.submit(list(enumerate(items)), prompts.IMAGE_PROMPT)))
        finally:
            pool.close()
        s.report.add(what="image preprocessing", path=f"{workers} worker process{'es' if workers > 1 else ''}",
                     items=len(items), **{"items/s": len(items) / sw, "note": f"x{s1 / sw:.2f}"})


def anyres_capped(s: Session, full) -> None:
    """The AnyRes cap (``--anyres-max-tiles``): speed-up and distance to ``full``, the engine's full-AnyRes
    result and seconds."""
    items, tiles, budget = s.image_items, s.args.anyres_max_tiles, s.args.max_batch_tokens
    cfg, ip = s.backbone.model.config, s.backbone.image_processor
    saved = (cfg.image_grid_pinpoints, ip.image_grid_pinpoints)
    try:
        s.backbone.limit_anyres(tiles)  # the engine restarts its workers with the capped processor
        s.embed(items[:2], prompts.IMAGE_PROMPT)
        res, sec, peak = s.clock(lambda: s.embed(items, prompts.IMAGE_PROMPT))
    finally:
        cfg.image_grid_pinpoints, ip.image_grid_pinpoints = saved
    s.report.add(what="images, AnyRes capped", path=f"e5v, max {tiles} tile(s)", items=len(items),
                 batch=f"<= {budget} tok", tokens=int(res.tokens.sum()), **{
                     "items/s": len(items) / sec, "tokens/s": int(res.tokens.sum()) / sec, "peak GiB": peak,
                     "min cosine": min_cosine(full[0].vectors, res.vectors),
                     "note": f"{res.tokens.sum() / len(items):.0f} tokens/image; x{full[1] / sec:.2f} vs full AnyRes "
                             "e5v; cosine is to full-AnyRes e5v vectors (random weights)"})


def packed_flex(s: Session) -> None:
    """Packed batches under FlexAttention (block-sparse: no work across sequences), compiled on first use.
    Optional and last: a failure (compiler, memory) is recorded as a row and the measured rows stay."""
    model = s.backbone.model
    try:
        model.set_attn_implementation({"text_config": "flex_attention"})
        s.embed(s.texts[:8], prompts.TEXT, packing=True)  # compilation, not timed
        s.embed(s.image_items[:2], prompts.IMAGE_PROMPT, packing=True)
        for what in ("texts", "images"):
            engine_path(s, what, "e5v packed flex", {"packing": True}, "one row, FlexAttention block mask")
    except Exception as exc:  # noqa: BLE001 - reported in the results, not raised
        log.exception("FlexAttention packing failed")
        s.report.add(what="texts and images", path="e5v packed flex", note=f"failed: {type(exc).__name__}: {exc}"[:300])
    finally:
        model.set_attn_implementation({"text_config": s.args.attn})
