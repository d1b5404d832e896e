"""``e5v bench``: the official E5-V recipe against e5v's engine, in one run, on one device.

The model is the real llama3-llava-next-8b architecture (``configs/llama3-llava-next-8b/config.json``, the one
royokong/e5-v uses) with random weights: speed and memory do not depend on the weight values, and nothing
is downloaded. ``--tiny`` keeps the real image geometry (336-px CLIP-L/14 tiles, AnyRes pinpoints, 128,320
vocabulary) with a narrow, shallow network, so the whole benchmark runs on a CPU in seconds: the tests use it
to check that both paths run and agree, not their speed.

Measured: images/s on COCO-like sizes at full AnyRes (JPEG files in memory, decoded by both paths), texts/s
(32-55 tokens each with the prompt), tokens/s, peak accelerator memory, image decoding + preprocessing rate (one
process against worker processes), the smallest cosine between the two paths' vectors for the same item, and
the speed-up of the AnyRes cap. The official recipe runs at its default batch (1 for images, 15 for texts) and
at larger ones (``--image-batches``, ``--text-batches``), and the engine at each of those too, so that peak
memory is compared batch for batch. Results are written after each row (JSON and a markdown table, with a
summary against the targets of issue 6), so a run cut short keeps what it measured.

The official recipe, as E5-V's code runs it: the HF processor (PIL backend, left padding) on the main process,
the full ``LlavaNextForConditionalGeneration`` with ``output_hidden_states=True`` (logits over every position,
every hidden state kept), ``hidden_states[-1][:, -1]``, L2-normalised.
"""
from __future__ import annotations

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
def make_images(n: int, seed: int = 0) -> list[bytes]:
    """JPEG files (in memory) at COCO-like sizes: both paths decode them, as they would read COCO from disk."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in (COCO_SIZES[k % len(COCO_SIZES)] for k in range(n)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


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
    """The official recipe (see the module docstring), in input order: unit vectors and each input's length in
    tokens. ``images`` are encoded files, decoded with PIL as the official code opens them."""
    import io

    import torch
    import torch.nn.functional as F
    from PIL import Image

    from . import prompts

    model, processor = backbone.model, backbone.processor
    processor.tokenizer.padding_side = "left"
    chat = prompts.CHAT_FORMATS["llama3"]
    items = texts if texts is not None else images
    out, tokens = [], []
    with torch.inference_mode():
        for k in range(0, len(items), batch):
            chunk = items[k:k + batch]
            if texts is not None:
                enc = processor(text=[chat.format(prompts.TEXT).replace(prompts.SENT, t) for t in chunk],
                                return_tensors="pt", padding=True)
            else:
                decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk]
                enc = processor(text=[chat.format(prompts.IMAGE_PROMPT)] * len(chunk), images=decoded,
                                return_tensors="pt", padding=True)
            tokens.append(enc["attention_mask"].sum(1))
            enc = {key: v.to(backbone.device) for key, v in enc.items()}
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(backbone.dtype)
            hidden = model(**enc, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1]
            out.append(F.normalize(hidden.float(), dim=-1).cpu())
    return torch.cat(out).numpy(), torch.cat(tokens).numpy()


def min_cosine(a, b) -> float:
    import numpy as np

    return float(np.min(np.sum(a * b, axis=1)))


class Report:
    """Rows of measurements and the summary against the targets, rewritten to JSON and markdown after each row."""

    def __init__(self, meta: dict, json_path: Path | None, md_path: Path | None):
        self.meta, self.rows, self.json_path, self.md_path = meta, [], json_path, md_path

    def add(self, **row) -> dict:
        row = {k: (round(v, 6 if k == "min cosine" else 2) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        log.info("%s", row)
        self.write()
        return row

    def as_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "summary": summarize(self.rows)}

    def markdown(self) -> str:
        m = self.meta
        head = [f"Device: {m['device_name']}; torch {m['torch']}, transformers {m['transformers']}, {m['dtype']}, "
                f"LM attention {m['attn_implementation']}; {m['date']}; model: {m['model']}.", ""]
        cols = ["what", "path", "batch", "items", "items/s", "tokens/s", "peak GiB", "min cosine", "note"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
        summary = summarize(self.rows)
        return "\n".join(head + lines + ([""] + [f"- {line}" for line in summary] if summary else [])) + "\n"

    def write(self) -> None:
        from .parts import atomic_write_bytes

        if self.json_path:
            atomic_write_bytes(self.json_path, (json.dumps(self.as_dict(), indent=2) + "\n").encode())
        if self.md_path:
            atomic_write_bytes(self.md_path, self.markdown().encode())


def summarize(rows: list[dict]) -> list[str]:
    """The measured rows read against issue 6's targets: best speeds, peak memory at the same batch, whether
    preprocessing keeps up, the AnyRes cap. Only what the rows so far hold."""
    def pick(what, engine):
        return [r for r in rows if r["what"] == what and r["path"].startswith("e5v") == engine
                and r.get("items/s") is not None]

    def fmt(r):
        return f"{r['items/s']} ({r['path']}, batch {r['batch']})"

    out = []
    for what, unit, target in (("images", "images/s at full AnyRes", "target >= 16 images/s, cosine >= 0.999"),
                               ("texts", "texts/s", "target >= 1,000 texts/s")):
        ours, official = pick(what, True), pick(what, False)
        if ours and official:
            best, ref = max(ours, key=lambda r: r["items/s"]), max(official, key=lambda r: r["items/s"])
            worst = min(r["min cosine"] for r in ours if r.get("min cosine") is not None)
            out.append(f"{unit}: e5v best {fmt(best)}, official recipe best {fmt(ref)}, "
                       f"x{best['items/s'] / ref['items/s']:.2f}; "
                       f"smallest cosine to the official recipe over all e5v paths {worst} ({target})")
        for b in sorted({r["batch"] for r in official if isinstance(r["batch"], int)}):
            same = [r for r in ours if r["batch"] == b]
            theirs = next(r for r in official if r["batch"] == b)
            if same and same[0].get("peak GiB") is not None and theirs.get("peak GiB") is not None:
                out.append(f"peak memory, {what} at batch {b}: e5v {same[0]['peak GiB']} GiB, official recipe "
                           f"{theirs['peak GiB']} GiB (target: no higher)")
    prep = [r for r in rows if r["what"] == "image preprocessing"]
    ours = pick("images", True)
    if prep and ours:
        used = prep[-1]  # the engine's setting: its worker processes, when it has any
        need = max(r["items/s"] for r in ours)
        out.append(f"image decoding + preprocessing: {used['items/s']} images/s ({used['path']}) against "
                   f"{need} images/s used by the fastest e5v path: "
                   f"{'keeps up' if used['items/s'] >= need else 'too slow, the model waits'}")
    for r in rows:
        if r["what"] == "images, AnyRes capped":
            out.append(f"AnyRes cap ({r['path']}): {r['items/s']} images/s; {r['note']}")
    return out


def environment(device, dtype, attn: str, model: str) -> dict:
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "dtype": str(dtype).replace("torch.", ""), "attn_implementation": attn, "model": model,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}


def batch_sizes(text: str, n: int) -> list[int]:
    """``"1,8"`` -> [1, 8], each at most ``n`` (the number of items), without repeats, in the given order."""
    from .errors import ConfigError

    try:
        sizes = [min(int(v), n) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"batch sizes must be integers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be >= 1, not {text!r}")
    return list(dict.fromkeys(sizes))


def run(args) -> dict:
    import torch

    from . import prompts
    from .encoder import E5V, Item, resolve_device, resolve_dtype
    from .workers import PreparePool

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"),
                          device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    image_batches = batch_sizes(args.image_batches, args.images)
    text_batches = batch_sizes(args.text_batches, args.texts)
    extra = {v.strip() for v in args.variants.split(",") if v.strip()}
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

    official: dict[str, dict] = {"images": {}, "texts": {}}  # batch -> (vectors, row)

    def measure_official(what, batch, **inputs):
        (vecs, tokens), s, p = clock(lambda: reference_embed(bb, batch=batch, **inputs))
        n = len(tokens)
        note = (f"{tokens.sum() / n:.0f} tokens/image, decoding + preprocessing on the main process"
                if what == "images" else f"{tokens.sum() / n:.1f} tokens/text")
        row = report.add(what=what, path="official recipe", batch=batch, items=n, tokens=int(tokens.sum()),
                         **{"items/s": n / s, "tokens/s": int(tokens.sum()) / s, "peak GiB": p, "note": note})
        official[what][batch] = (vecs, row)

    def measure_engine(what, items, prompt, name, opts, note):
        res, s, p = clock(lambda: engine_embed(items, prompt, **opts))
        first = next(iter(official[what].values()))
        ref_vecs, ref_row = first
        rate = len(items) / s
        note = f"{note}; {args.workers} workers; x{rate / ref_row['items/s']:.2f} vs official batch {ref_row['batch']}"
        batch = opts.get("max_batch_size", f"<= {args.max_batch_tokens} tok")
        same = official[what].get(batch)
        if same and p is not None and same[1]["peak GiB"] is not None:
            note += f"; peak x{p / same[1]['peak GiB']:.2f} of official at batch {batch}"
        return res, s, report.add(what=what, path=name, batch=batch, items=len(items), tokens=int(res.tokens.sum()), **{
            "items/s": rate, "tokens/s": int(res.tokens.sum()) / s, "peak GiB": p,
            "min cosine": min_cosine(ref_vecs, res.vectors), "note": note})

    # warm-up: kernels, allocator, worker start-up (not timed)
    reference_embed(bb, images=images[:1], batch=1)
    reference_embed(bb, texts=texts[:2], batch=2)
    engine_embed(image_items[:2], prompts.IMAGE_PROMPT)
    engine_embed(texts[:4], prompts.TEXT)

    # 1. images, full AnyRes: the official recipe at its default batch first, then the engine's paths, then
    # both at the same batch sizes (the peak-memory target compares them batch for batch)
    measure_official("images", image_batches[0], images=images)
    variants = [("e5v", {}, "sorted by length, token budget, padded")]
    if "packed" in extra:
        variants.append(("e5v packed", {"packing": True}, f"one row, block-diagonal mask ({args.attn})"))
    if "grouped" in extra:
        variants.append(("e5v grouped", {"group_lengths": True}, "one length per batch, no padding"))
    full = None
    for name, opts, note in variants:
        res, s, _ = measure_engine("images", image_items, prompts.IMAGE_PROMPT, name, opts, note)
        full = full or (res, s)
    unbounded = 1 << 40  # no token budget: batches of exactly max_batch_size items, as the official recipe's
    for b in image_batches[1:]:
        measure_official("images", b, images=images)
    for b in image_batches:
        measure_engine("images", image_items, prompts.IMAGE_PROMPT, "e5v",
                       {"max_batch_size": b, "max_batch_tokens": unbounded}, "same batch as the official recipe")

    # 2. texts
    measure_official("texts", text_batches[0], texts=texts)
    text_variants = [("e5v", {}, "sorted by length, token budget, padded")]
    if "grouped" in extra:
        text_variants.append(("e5v grouped", {"group_lengths": True}, "one length per batch, no padding"))
    if "packed" in extra:
        text_variants.append(("e5v packed", {"packing": True}, f"one row, block-diagonal mask ({args.attn})"))
    for name, opts, note in text_variants:
        measure_engine("texts", texts, prompts.TEXT, name, opts, note)
    for b in text_batches[1:]:
        measure_official("texts", b, texts=texts)
    for b in text_batches:
        measure_engine("texts", texts, prompts.TEXT, "e5v", {"max_batch_size": b, "max_batch_tokens": unbounded},
                       "same batch as the official recipe")

    # 3. image decoding + preprocessing alone: one process against the worker pool
    preparer = engine._preparer()
    _, s1, _ = clock(lambda: [preparer.prepare(it, prompts.IMAGE_PROMPT) for it in image_items])
    report.add(what="image preprocessing", path="1 process", items=len(images),
               **{"items/s": len(images) / s1, "note": "JPEG decoding, checks, AnyRes tiles, tokens"})
    if args.workers > 0:
        pool = PreparePool(preparer.shippable(), args.workers)
        try:
            pool.collect(pool.submit(list(enumerate(image_items[:args.workers])), prompts.IMAGE_PROMPT))  # start-up
            _, sw, _ = clock(lambda: pool.collect(pool.submit(list(enumerate(image_items)), prompts.IMAGE_PROMPT)))
        finally:
            pool.close()
        report.add(what="image preprocessing", path=f"{args.workers} worker process{'es' if args.workers > 1 else ''}",
                   items=len(images), **{"items/s": len(images) / sw, "note": f"x{s1 / sw:.2f}"})

    # 4. AnyRes capped: speed-up and distance to the full-AnyRes vectors
    cfg, ip = bb.model.config, bb.image_processor
    saved = (cfg.image_grid_pinpoints, ip.image_grid_pinpoints)
    try:
        bb.limit_anyres(args.anyres_max_tiles)  # the engine restarts its workers with the capped processor
        engine_embed(image_items[:2], prompts.IMAGE_PROMPT)
        res, s, p = clock(lambda: engine_embed(image_items, prompts.IMAGE_PROMPT))
    finally:
        cfg.image_grid_pinpoints, ip.image_grid_pinpoints = saved
    report.add(what="images, AnyRes capped", path=f"e5v, max {args.anyres_max_tiles} tile(s)", items=len(images),
               batch=f"<= {args.max_batch_tokens} tok", tokens=int(res.tokens.sum()), **{
                   "items/s": len(images) / s, "tokens/s": int(res.tokens.sum()) / s, "peak GiB": p,
                   "min cosine": min_cosine(full[0].vectors, res.vectors),
                   "note": f"{res.tokens.sum() / len(images):.0f} tokens/image; x{full[1] / s:.2f} vs full AnyRes e5v; "
                           "cosine is to full-AnyRes e5v vectors (random weights)"})

    # 5. packed batches under FlexAttention (block-sparse: no work across sequences); compiled on first use.
    # Optional and last: a failure (compiler, memory) is recorded as a row and the measured rows stay.
    if "flex" in extra:
        try:
            bb.model.set_attn_implementation({"text_config": "flex_attention"})
            engine_embed(texts[:8], prompts.TEXT, packing=True)  # compilation, not timed
            engine_embed(image_items[:2], prompts.IMAGE_PROMPT, packing=True)
            for what, items, prompt in (("texts", texts, prompts.TEXT), ("images", image_items, prompts.IMAGE_PROMPT)):
                measure_engine(what, items, prompt, "e5v packed flex", {"packing": True},
                               "one row, FlexAttention block mask")
        except Exception as exc:  # noqa: BLE001 - reported in the results, not raised
            log.exception("FlexAttention packing failed")
            report.add(what="texts and images", path="e5v packed flex",
                       note=f"failed: {type(exc).__name__}: {exc}"[:300])
        finally:
            bb.model.set_attn_implementation({"text_config": args.attn})
    engine.close()
    return report.as_dict()


def run_bench(args) -> int:
    from .errors import ConfigError

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


def main(argv=None) -> int:
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["add_parsers", "build_backbone", "build_config", "offline_tokenizer", "reference_embed", "run", "summarize"]
