"""``e5v embed``: texts, images or composed (image + text) pairs into a vector file and its ids, resumable."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from .common import EXIT_SKIPPED, EXIT_USAGE, add_model_args, count, engine_config, items_reported_here, load_model


def add_parsers(sub) -> None:
    p = sub.add_parser("embed", help="embed texts, images or image+text pairs into a vector file",
                       description="Embed texts, images or composed (image + text) pairs. Writes the vectors "
                                   "(.npy or .safetensors) and their ids (JSONL, one line per row).")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="text file (one text per line) or JSONL with a 'text' field")
    src.add_argument("--images", help="image file, folder (recursive), glob, or manifest (.jsonl/.csv/.parquet/.txt)")
    src.add_argument("--pairs", help="JSONL with 'image' and 'text' (composed queries)")
    p.add_argument("--task", help="cirr or fashioniq-{dress,shirt,toptee}: composed query prompt for --pairs, "
                                  "gallery prompt for --images")
    p.add_argument("--prompt", help="your own prompt, with <sent> for the text and <image> for the image")
    p.add_argument("--out", required=True, help="output vectors: .npy or .safetensors")
    p.add_argument("--ids", help="output ids JSONL (default: OUT.ids.jsonl, e.g. photos.npy.ids.jsonl)")
    p.add_argument("--precision", choices=["float32", "float16", "int8", "binary"], default="float32",
                   help="stored vectors; int8 (ranges calibrated on these vectors) and binary (sign bits, 8 per "
                        "byte) write codes, with the codec beside them (OUT.codec.json, and OUT.codec.npy for int8) "
                        "to read them with e5v.vectors.load_codec")
    p.add_argument("--part-size", type=count(), default=1024, help="items per resumable part")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_embed)


def default_prompt(args) -> str:
    from .. import prompts

    if args.prompt:
        return args.prompt
    if args.texts:
        return prompts.TEXT
    if args.images:
        return prompts.image_prompt(args.task)
    return prompts.composed_prompts(args.task or "cirr")[0]


def read_records(args):
    from ..readers import list_images, read_pairs, read_texts

    if args.texts:
        return [(r.id, r, f"{args.texts} id={r.id}") for r in read_texts(args.texts)]
    if args.images:
        return [(r.id, r, r.image) for r in list_images(args.images)]
    return [(r.id, r, f"{args.pairs} id={r.id} ({r.image})") for r in read_pairs(args.pairs)]


def output_files(out: Path, ids: str | None) -> tuple[Path, Path]:
    """The ids and skip-report files of an output, named after its full name: ``photos.npy`` and
    ``photos.safetensors`` side by side each keep their own (``photos.npy.ids.jsonl``, ...)."""
    return (Path(ids) if ids else out.with_name(out.name + ".ids.jsonl")), out.with_name(out.name + ".skipped.jsonl")


def run_embed(args) -> int:
    import numpy as np

    from ..items import Item
    from ..parts import PartStore

    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        print(f"e5v embed: error: --out must end in .npy or .safetensors, not {out.name!r}", file=sys.stderr)
        return EXIT_USAGE
    records = read_records(args)
    prompt = default_prompt(args)
    items = [Item(text=r.text, image=r.image, name=name) for _, r, name in records]
    fingerprint = {**engine_config(args).vector_settings(), "prompt": prompt, "part_size": args.part_size,
                   "inputs": hashlib.sha256(json.dumps([[i, r.text, r.image] for i, r, _ in records]).encode())
                   .hexdigest()}
    parts_dir = out.parent / f".{out.name}.parts"
    store = PartStore(parts_dir, fingerprint)
    nparts = (len(items) + args.part_size - 1) // args.part_size
    todo = [k for k in range(nparts) if not store.done(k)]
    model = load_model(args) if todo or not items else None  # no items: the model still gives the output's width
    embedded_now, seconds = embed_parts(args, model, items, prompt, store, todo) if todo else (0, 0.0)

    parts = [store.read(k) for k in range(nparts)]
    dim = parts[0]["vectors"].shape[1] if parts else model.dim  # a part without rows still has its width
    vectors = np.concatenate([p["vectors"] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    vectors = encode(vectors, args.precision, out)
    indices = np.concatenate([p["indices"] for p in parts]).tolist() if parts else []
    skipped = [(int(i), str(r)) for p in parts for i, r in zip(p["skipped"], p["reasons"])]
    ids_out, skipped_out = write_outputs(out, args.ids, vectors, records, indices, skipped)
    shutil.rmtree(parts_dir, ignore_errors=True)
    if not items:
        note = "the input holds 0 items"
    elif not todo:
        note = "resumed, nothing left to embed"
    else:
        note = f"{embedded_now / max(seconds, 1e-9):.1f} items/s"
    print(f"embedded {len(indices)} of {len(items)} items, skipped {len(skipped)}"
          f"{f' (see {skipped_out})' if skipped else ''}; {note}; vectors {vectors.shape} -> {out}, ids -> {ids_out}")
    return EXIT_SKIPPED if skipped else 0


def encode(vectors, precision: str, out: Path):
    """The vectors in ``precision``; for int8 and binary the codec, fitted on them, is saved beside ``out``."""
    import numpy as np

    from ..vectors import make_codec, save_codec
    from ..vectors.codecs import codec_files

    codec = make_codec(precision, vectors.shape[1])
    saved = out.with_name(out.name + ".codec.json")
    for path in codec_files(saved):  # a codec of an earlier run is not this one's
        path.unlink(missing_ok=True)
    if precision in ("int8", "binary") and len(vectors):  # no vectors: nothing to calibrate, nothing to decode
        save_codec(codec.fit(vectors), saved)
    elif precision == "int8":
        return np.zeros(vectors.shape, np.int8)
    return codec.encode(vectors)


def embed_parts(args, model, items: list, prompt: str, store, todo: list[int]) -> tuple[int, float]:
    """Embed the parts ``todo`` of ``items`` into ``store``, each written whole; returns (items embedded, seconds
    of embedding, not counting the model's loading)."""
    import numpy as np
    from tqdm.auto import tqdm

    started, embedded = time.perf_counter(), 0
    bar = tqdm(total=len(items), unit="item", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
    bar.update(len(items) - sum(min(args.part_size, len(items) - k * args.part_size) for k in todo))
    with items_reported_here():
        for k in todo:
            lo = k * args.part_size
            chunk = items[lo:lo + args.part_size]
            res = model.embed(chunk, prompt=prompt)
            store.write(k, vectors=res.vectors, indices=res.indices + lo,
                        skipped=np.asarray([i + lo for i, _ in res.skipped], dtype=np.int64),
                        reasons=np.asarray([e.reason for _, e in res.skipped], dtype=str))
            embedded += len(res)
            bar.update(len(chunk))
    bar.close()
    return embedded, time.perf_counter() - started


def write_outputs(out: Path, ids: str | None, vectors, records: list, indices: list[int],
                  skipped: list[tuple[int, str]]) -> tuple[Path, Path]:
    """Write the vectors, their ids and the skip report (each atomically); print the first skipped items."""
    import numpy as np

    from ..parts import atomic_save, atomic_write_bytes

    ids_out, skipped_out = output_files(out, ids)
    if out.suffix == ".npy":
        atomic_save(out, lambda tmp: np.save(tmp, vectors))  # tmp ends in .npy: saved as named
    else:
        from safetensors.numpy import save_file

        atomic_save(out, lambda tmp: save_file({"embeddings": np.ascontiguousarray(vectors)}, tmp))
    lines = [json.dumps({"id": records[i][0], "index": i}) for i in indices]  # ASCII: odd names survive as escapes
    atomic_write_bytes(ids_out, ("\n".join(lines) + "\n" if lines else "").encode())
    if skipped:
        rows = [json.dumps({"id": records[i][0], "item": records[i][2], "reason": r}) for i, r in skipped]
        atomic_write_bytes(skipped_out, ("\n".join(rows) + "\n").encode())
        for i, r in skipped[:20]:
            print(f"skipped {records[i][2]}: {r}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"... and {len(skipped) - 20} more skipped (see {skipped_out})", file=sys.stderr)
    else:
        skipped_out.unlink(missing_ok=True)
    return ids_out, skipped_out
