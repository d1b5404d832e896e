"""``e5v bench``: the official E5-V recipe against e5v's engine, in one run, on one device.

The model is the real llama3-llava-next-8b architecture (``configs/llama3-llava-next-8b/config.json``, the one
royokong/e5-v uses) with random weights: speed and memory do not depend on the weight values, and nothing
is downloaded. ``--tiny`` keeps the real image geometry (336-px CLIP-L/14 tiles, AnyRes pinpoints, 128,320
vocabulary) with a narrow, shallow network, so the whole benchmark runs on a CPU in seconds: the tests use it
to check that both paths run and agree, not their speed.

Measured: images/s on COCO-like sizes at full AnyRes, texts/s (32-55 tokens each with the prompt), tokens/s,
peak accelerator memory, image preprocessing rate (one process against worker processes), the smallest
cosine between the two paths' vectors for the same item, and the speed-up of the AnyRes cap. Results are
written after each step (JSON and a markdown table), so a run cut short keeps what it measured.

The official recipe, as E5-V's code runs it: the HF processor (PIL backend, left padding) on the main process,
the full ``LlavaNextForConditionalGeneration`` with ``output_hidden_states=True`` (logits over every position,
every hidden state kept), ``hidden_states[-1][:, -1]``, L2-normalised; batch 1 for images, 15 for texts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama3-llava-next-8b" / "config.json"
COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (375, 500), (612, 612), (640, 360)]
TEXT_TOKENS = (32, 55)  # prompt + caption, as in GPU_ANCHORS.md
#: Llama-3 special token ids (the real tokenizer's) and E5-V's ``<image>`` id, one past Llama-3's 128,256.
LLAMA3_SPECIALS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                   "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<pad>": 128004}
IMAGE_TOKEN_ID = 128256
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_WORDS = ("a man woman child dog cat two small red blue green white black people street table food car tree "
          "sitting standing playing holding next to on in the of with near front large young old field water "
          "building road train plate pizza bus group grass sky beach ball picture kitchen room city").split()


# --- building the model offline ---------------------------------------------------------------------------
def offline_tokenizer(vocab_size: int = 128320, image_id: int = IMAGE_TOKEN_ID):
    """A Llama-3-shaped fast tokenizer built offline: BOS added, no EOS, Llama-3's special ids, ``<image>``
    at ``image_id`` as in royokong/e5-v. Its ordinary tokens come from e5v.tiny's small byte-level BPE (any text
    tokenises, never to UNK); the ids in between are unused placeholders, so every id fits ``vocab_size``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from .tiny import _LLAMA3, _build_tokenizer

    small = _build_tokenizer(_LLAMA3, image_token="<image>", vocab_size=2000)
    data = json.loads(small.backend_tokenizer.to_str())
    ids = {**LLAMA3_SPECIALS, "<image>": image_id}
    ordinary = sorted((i, t) for t, i in data["model"]["vocab"].items() if t not in ids)
    vocab = {t: k for k, (_, t) in enumerate(ordinary)}
    taken = set(ids.values())
    vocab.update({f"<|reserved_{k}|>": k for k in range(len(vocab), image_id) if k not in taken})
    vocab.update(ids)  # the specials live in the model vocabulary too, so their ids are kept on loading
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids reach {max(vocab.values())}, over the vocabulary of {vocab_size}")
    data["model"]["vocab"] = vocab
    for tok in data["added_tokens"]:
        tok["id"] = ids[tok["content"]]
    for spec in data["post_processor"]["special_tokens"].values():
        spec["ids"] = [ids[t] for t in spec["tokens"]]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>",
                                   padding_side="left", extra_special_tokens={"image_token": "<image>"})


def build_config(config_path=CONFIG, *, tiny: bool = False):
    from transformers import LlavaNextConfig

    raw = json.loads(Path(config_path).read_text())
    if tiny:
        raw["text_config"].update(TINY_TEXT)
        raw["vision_config"].update(TINY_VISION)
    return LlavaNextConfig.from_dict(raw)


def build_backbone(config, *, device, dtype, attn_implementation: str = "sdpa"):
    """The model with random weights, made directly on ``device`` in ``dtype``, and E5-V's processor."""
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from .backbones.llava import fix_processor_and_model
    from .backbones.llava_next import LlavaNextBackbone

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no fp32 copy of 8 B weights
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    tile = config.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, resample=3,
        image_grid_pinpoints=config.image_grid_pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=offline_tokenizer(
        config.text_config.vocab_size, config.image_token_id), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1)
    fix_processor_and_model(processor, model)
    return LlavaNextBackbone(model, processor, chat_format="llama3", path=f"random {config.model_type}")


# --- inputs ----------------------------------------------------------------------------------------------
def make_images(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in (COCO_SIZES[k % len(COCO_SIZES)] for k in range(n))]


def make_texts(n: int, backbone, seed: int = 0) -> list[str]:
    """Captions whose full prompt takes 32-55 tokens, lengths spread evenly."""
    import numpy as np

    from . import prompts

    rng = np.random.default_rng(seed)
    template = backbone.render(prompts.TEXT)
    texts = []
    for _ in range(n):
        target, words = int(rng.integers(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1)), []
        while True:
            words.append(str(rng.choice(_WORDS)))
            text = " ".join(words).capitalize() + "."
            if len(backbone.prepare(prompts.fill(template, text))) >= target:
                break
        texts.append(text)
    return texts


# --- measuring -----------------------------------------------------------------------------------------
class Clock:
    """Wall time and peak accelerator memory of one measured call."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __call__(self, fn):
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return result, seconds, peak


def reference_embed(backbone, *, texts=None, images=None, batch: int):
    """The official recipe (see the module docstring), in input order."""
    import torch
    import torch.nn.functional as F

    from . import prompts

    model, processor = backbone.model, backbone.processor
    processor.tokenizer.padding_side = "left"
    chat = prompts.CHAT_FORMATS["llama3"]
    items = texts if texts is not None else images
    out = []
    with torch.inference_mode():
        for k in range(0, len(items), batch):
            chunk = items[k:k + batch]
            if texts is not None:
                enc = processor(text=[chat.format(prompts.TEXT).replace(prompts.SENT, t) for t in chunk],
                                return_tensors="pt", padding=True)
            else:
                enc = processor(text=[chat.format(prompts.IMAGE_PROMPT)] * len(chunk), images=chunk,
                                return_tensors="pt", padding=True)
            enc = {key: v.to(backbone.device) for key, v in enc.items()}
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(backbone.dtype)
            hidden = model(**enc, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1]
            out.append(F.normalize(hidden.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


def min_cosine(a, b) -> float:
    import numpy as np

    return float(np.min(np.sum(a * b, axis=1)))


class Report:
    """Rows of measurements, rewritten to JSON and markdown after each one."""

    def __init__(self, meta: dict, json_path: Path | None, md_path: Path | None):
        self.meta, self.rows, self.json_path, self.md_path = meta, [], json_path, md_path

    def add(self, **row) -> dict:
        row = {k: (round(v, 6 if k == "min cosine" else 2) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        log.info("%s", row)
        self.write()
        return row

    def as_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    def markdown(self) -> str:
        m = self.meta
        head = [f"Device: {m['device_name']}; torch {m['torch']}, transformers {m['transformers']}, {m['dtype']}, "
                f"LM attention {m['attn_implementation']}; {m['date']}; model: {m['model']}.", ""]
        cols = ["what", "path", "batch", "items", "items/s", "tokens/s", "peak GiB", "min cosine", "note"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
        return "\n".join(head + lines) + "\n"

    def write(self) -> None:
        from .parts import atomic_write_bytes

        if self.json_path:
            atomic_write_bytes(self.json_path, (json.dumps(self.as_dict(), indent=2) + "\n").encode())
        if self.md_path:
            atomic_write_bytes(self.md_path, self.markdown().encode())


def environment(device, dtype, attn: str, model: str) -> dict:
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "dtype": str(dtype).replace("torch.", ""), "attn_implementation": attn, "model": model,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}


def run(args) -> dict:
    import numpy as np
    import torch

    from . import prompts
    from .encoder import E5V, Item, resolve_device, resolve_dtype
    from .workers import PreparePool

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"),
                          device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    config = build_config(args.config, tiny=args.tiny)
    started = time.perf_counter()
    bb = build_backbone(config, device=device, dtype=dtype, attn_implementation=args.attn)
    params = sum(p.numel() for p in bb.model.parameters())
    label = f"{Path(args.config).parent.name}{' (tiny widths)' if args.tiny else ''}, {params / 1e9:.3f} B params"
    report = Report(environment(device, dtype, args.attn, label), args.out, args.markdown)
    log.info("built %s on %s in %.1f s", label, device, time.perf_counter() - started)
    clock = Clock(device)
    images, texts = make_images(args.images), make_texts(args.texts, bb)
    image_items = [Item(image=im, name=f"image {k}") for k, im in enumerate(images)]
    engine = E5V(bb, num_workers=args.workers, packing=False, max_batch_tokens=args.max_batch_tokens)

    def engine_embed(items, prompt, **opts):
        saved = {k: getattr(engine, k) for k in opts}
        try:
            for k, v in opts.items():
                setattr(engine, k, v)
            res = engine.embed(items, prompt=prompt)
        finally:
            for k, v in saved.items():
                setattr(engine, k, v)
        if res.skipped:
            raise RuntimeError(f"benchmark items were skipped: {res.skipped[:3]}")
        return res

    # warm-up: kernels, allocator, worker start-up (not timed)
    reference_embed(bb, images=images[:1], batch=1)
    reference_embed(bb, texts=texts[:2], batch=2)
    engine_embed(image_items[:2], prompts.IMAGE_PROMPT)
    engine_embed(texts[:4], prompts.TEXT)

    # 1. images, full AnyRes
    ref_img, sec, peak = clock(lambda: reference_embed(bb, images=images, batch=1))
    n_img_tokens = None
    variants = [("e5v", {"packing": False}, "sorted by length, token budget, padded")]
    extra = {v.strip() for v in args.variants.split(",") if v.strip()}
    if "packed" in extra:
        variants.append(("e5v packed", {"packing": True}, f"one row, block-diagonal mask ({args.attn})"))
    if "grouped" in extra:
        variants.append(("e5v grouped", {"packing": False, "group_lengths": True}, "one length per batch, no padding"))
    if "b1" in extra:
        variants.append(("e5v", {"packing": False, "max_batch_size": 1}, "batch 1, as the reference"))
    img_rows = []
    for name, opts, note in variants:
        res, s, p = clock(lambda: engine_embed(image_items, prompts.IMAGE_PROMPT, **opts))
        n_img_tokens = int(res.tokens.sum())
        img_rows.append((name, opts, note, res, s, p))
    ref_rate = len(images) / sec
    report.add(what="images", path="official recipe", batch=1, items=len(images), **{
        "items/s": len(images) / sec, "tokens/s": n_img_tokens / sec, "peak GiB": peak,
        "note": f"{n_img_tokens / len(images):.0f} tokens/image, preprocessing on the main process"})
    best = None
    for name, opts, note, res, s, p in img_rows:
        row = report.add(what="images", path=name, batch=opts.get("max_batch_size", f"<= {args.max_batch_tokens} tok"),
                         items=len(images), **{"items/s": len(images) / s, "tokens/s": n_img_tokens / s,
                                               "peak GiB": p, "min cosine": min_cosine(ref_img, res.vectors),
                                               "note": f"{note}; {args.workers} workers; x{(len(images) / s) / ref_rate:.2f}"})
        best = row if best is None or row["items/s"] > best["items/s"] else best

    # 2. texts
    ref_txt, sec, peak = clock(lambda: reference_embed(bb, texts=texts, batch=15))
    ntok = sum(len(bb.prepare(prompts.fill(bb.render(prompts.TEXT), t))) for t in texts)
    report.add(what="texts", path="official recipe", batch=15, items=len(texts), **{
        "items/s": len(texts) / sec, "tokens/s": ntok / sec, "peak GiB": peak, "note": f"{ntok / len(texts):.1f} tokens/text"})
    ref_text_rate = len(texts) / sec
    text_variants = [("e5v", {"packing": False}, "sorted by length, token budget, padded")]
    if "grouped" in extra:
        text_variants.append(("e5v grouped", {"packing": False, "group_lengths": True}, "one length per batch, no padding"))
    if "packed" in extra:
        text_variants.append(("e5v packed", {"packing": True}, f"one row, block-diagonal mask ({args.attn})"))
    for name, opts, note in text_variants:
        res, s, p = clock(lambda: engine_embed(texts, prompts.TEXT, **opts))
        report.add(what="texts", path=name, batch=f"<= {args.max_batch_tokens} tok", items=len(texts), **{
            "items/s": len(texts) / s, "tokens/s": ntok / s, "peak GiB": p,
            "min cosine": min_cosine(ref_txt, res.vectors), "note": f"{note}; x{(len(texts) / s) / ref_text_rate:.2f}"})

    # 3. image preprocessing alone: one process against the worker pool
    preparer = engine._preparer()
    _, s1, _ = clock(lambda: [preparer.prepare(it, prompts.IMAGE_PROMPT) for it in image_items])
    report.add(what="image preprocessing", path="1 process", items=len(images), **{"items/s": len(images) / s1})
    if args.workers > 0:
        pool = PreparePool(preparer.shippable(), args.workers)
        try:
            pool.collect(pool.submit(list(enumerate(image_items[:args.workers])), prompts.IMAGE_PROMPT))  # start-up
            _, sw, _ = clock(lambda: pool.collect(pool.submit(list(enumerate(image_items)), prompts.IMAGE_PROMPT)))
        finally:
            pool.close()
        report.add(what="image preprocessing", path=f"{args.workers} worker process{'es' if args.workers > 1 else ''}",
                   items=len(images),
                   **{"items/s": len(images) / sw, "note": f"x{s1 / sw:.2f}"})

    # 4. AnyRes capped at one grid tile: speed-up and distance to the full-AnyRes vectors
    full = next(r for r in img_rows if r[0] == "e5v" and "max_batch_size" not in r[1])
    cfg, ip = bb.model.config, bb.image_processor
    saved = (cfg.image_grid_pinpoints, ip.image_grid_pinpoints)
    try:
        bb.limit_anyres(args.anyres_max_tiles)
        engine.close()  # the workers hold the processor: restart them with the capped one
        engine_embed(image_items[:2], prompts.IMAGE_PROMPT)
        res, s, p = clock(lambda: engine_embed(image_items, prompts.IMAGE_PROMPT))
    finally:
        cfg.image_grid_pinpoints, ip.image_grid_pinpoints = saved
        engine.close()
    report.add(what="images, AnyRes capped", path=f"e5v, max {args.anyres_max_tiles} tile(s)", items=len(images),
               batch=f"<= {args.max_batch_tokens} tok", **{
                   "items/s": len(images) / s, "tokens/s": int(res.tokens.sum()) / s, "peak GiB": p,
                   "min cosine": min_cosine(full[3].vectors, res.vectors),
                   "note": f"{res.tokens.sum() / len(images):.0f} tokens/image; x{full[4] / s:.2f} vs full AnyRes e5v; "
                           "cosine is to full-AnyRes e5v vectors (random weights)"})
    # 5. packed batches under FlexAttention (block-sparse: no work across sequences); compiled on first use
    if "flex" in extra:
        bb.model.set_attn_implementation({"text_config": "flex_attention"})
        try:
            engine_embed(texts[:8], prompts.TEXT, packing=True)  # compilation, not timed
            engine_embed(image_items[:2], prompts.IMAGE_PROMPT, packing=True)
            for what, items, prompt, ref, rate, tok in (("texts", texts, prompts.TEXT, ref_txt, ref_text_rate, ntok),
                                                        ("images", image_items, prompts.IMAGE_PROMPT, ref_img,
                                                         ref_rate, n_img_tokens)):
                res, s, p = clock(lambda: engine_embed(items, prompt, packing=True))
                report.add(what=what, path="e5v packed flex", batch=f"<= {args.max_batch_tokens} tok",
                           items=len(items), **{"items/s": len(items) / s, "tokens/s": tok / s, "peak GiB": p,
                                                "min cosine": min_cosine(ref, res.vectors),
                                                "note": f"one row, FlexAttention block mask; x{(len(items) / s) / rate:.2f}"})
        finally:
            bb.model.set_attn_implementation({"text_config": args.attn})
    if best is not None:
        log.info("best image path: %s at %.2f images/s (official recipe %.2f)", best["path"], best["items/s"], ref_rate)
    return report.as_dict()


def run_bench(args) -> int:
    from .errors import ConfigError

    if args.images < 2 or args.texts < 4:
        raise ConfigError("--images must be >= 2 and --texts >= 4")
    result = run(args)
    rows = result["rows"]
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if v is not None))
    worst = min(r["min cosine"] for r in rows if r.get("min cosine") is not None and "capped" not in r["what"])
    print(f"bench: {len(rows)} measurements on {result['meta']['device_name']}; smallest cosine between the official "
          f"recipe and e5v: {worst:.6f}" + (f"; results -> {args.out}" if args.out else ""))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="measure the official recipe against e5v's engine (random weights, offline)",
                       description=__doc__.split("\n\n")[0] + " See the README section on speed.")
    p.add_argument("--config", default=str(CONFIG), help="LLaVA-NeXT config.json (default: llama3-llava-next-8b)")
    p.add_argument("--tiny", action="store_true", help="real image geometry and vocabulary, tiny widths (for CPU)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32")
    p.add_argument("--attn", default="sdpa", help="attention implementation of the model (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--images", type=int, default=64, help="images (COCO-like sizes, cycled)")
    p.add_argument("--texts", type=int, default=1024, help="texts (32-55 tokens with the prompt)")
    p.add_argument("--workers", type=int, default=4, help="preprocessing worker processes of the engine")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--anyres-max-tiles", type=int, default=1, help="AnyRes cap measured as the speed option")
    p.add_argument("--variants", default="packed,grouped,b1",
                   help="extra engine paths, comma-separated: packed (SDPA/eager block mask), grouped (one length "
                        "per batch), b1 (batch 1), "
                        "flex (packed under FlexAttention, compiled on first use: slow to start on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--markdown", type=Path, help="markdown table of the results")
    p.set_defaults(run=run_bench)


def main(argv=None) -> int:
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["add_parsers", "build_backbone", "build_config", "offline_tokenizer", "reference_embed", "run"]
