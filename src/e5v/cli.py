"""The ``e5v`` command: one program, one verb per job. Each long job shows progress, resumes after an
interruption, and ends with a summary line. Exit status: 0 done, 1 error, 2 usage, 3 done with skipped items.
Every error ends with one line on stderr, never a traceback (``--debug`` shows it)."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

EXIT_SKIPPED = 3

log = logging.getLogger("e5v")


def count(minimum: int = 1):
    """An argparse type: an integer of at least ``minimum`` (0 or a negative count would fail deep inside)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="hub id (e.g. royokong/e5-v) or local checkpoint directory")
    p.add_argument("--adapter", help="LoRA adapter directory to merge")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32 (auto: fp16 on GPU as the official recipe, fp32 on CPU)")
    p.add_argument("--chat-format", choices=["llama3", "mistral", "vicuna", "qwen", "raw"],
                   help="override the detected one (raw: no chat turn, the prompt as it is)")
    p.add_argument("--max-batch-tokens", type=count(), default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-batch-size", type=count(), default=256)
    p.add_argument("--max-length", type=count(), help="token limit per input; longer texts are truncated")
    p.add_argument("--workers", type=count(0), default=0,
                   help="preprocessing worker processes, overlapped with the model (default 0: in the main process)")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="padding-free batches (auto: only under FlashAttention or FlexAttention; same vectors)")
    p.add_argument("--group-lengths", action="store_true",
                   help="batches of one length only (unmasked SDPA kernels; same vectors)")
    p.add_argument("--anyres-max-tiles", type=count(),
                   help="speed option, a deviation from the official recipe: at most K AnyRes grid tiles per image")
    p.add_argument("--attn-implementation", help="sdpa, eager, flash_attention_2, flex_attention")


def load_model(args, **options):
    """The engine for the model flags of ``add_model_args`` (quietly with ``--no-progress``); ``options``: more
    engine options (``e5v eval`` sets the official protocols' ones)."""
    from .encoder import E5V

    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar

    return E5V.from_pretrained(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                               chat_format=args.chat_format, max_batch_tokens=args.max_batch_tokens,
                               max_batch_size=args.max_batch_size, max_length=args.max_length,
                               num_workers=args.workers, group_lengths=args.group_lengths,
                               packing={"on": True, "off": False}.get(args.packing, args.packing),
                               anyres_max_tiles=args.anyres_max_tiles, attn_implementation=args.attn_implementation,
                               **options)


# --- embed --------------------------------------------------------------------------------------------------
def embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed texts, images or image+text pairs into a vector file",
                       description="Embed texts, images or composed (image + text) pairs. Writes the vectors "
                                   "(.npy or .safetensors) and their ids (JSONL, one line per row).")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="text file (one text per line) or JSONL with a 'text' field")
    src.add_argument("--images", help="image file, folder (recursive), glob, or manifest (.jsonl/.csv/.txt)")
    src.add_argument("--pairs", help="JSONL with 'image' and 'text' (composed queries)")
    p.add_argument("--task", help="cirr or fashioniq-{dress,shirt,toptee}: composed query prompt for --pairs, "
                                  "gallery prompt for --images")
    p.add_argument("--prompt", help="your own prompt, with <sent> for the text and <image> for the image")
    p.add_argument("--out", required=True, help="output vectors: .npy or .safetensors")
    p.add_argument("--ids", help="output ids JSONL (default: OUT.ids.jsonl, e.g. photos.npy.ids.jsonl)")
    p.add_argument("--precision", choices=["float32", "float16"], default="float32")
    p.add_argument("--part-size", type=count(), default=1024, help="items per resumable part")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_embed)


def default_prompt(args) -> str:
    from . import prompts

    if args.prompt:
        return args.prompt
    if args.texts:
        return prompts.TEXT
    if args.images:
        return prompts.image_prompt(args.task)
    return prompts.composed_prompts(args.task or "cirr")[0]


def read_records(args):
    from .inputs import list_images, read_pairs, read_texts

    if args.texts:
        return [(r.id, r, f"{args.texts} id={r.id}") for r in read_texts(args.texts)]
    if args.images:
        return [(r.id, r, r.image) for r in list_images(args.images)]
    return [(r.id, r, f"{args.pairs} id={r.id} ({r.image})") for r in read_pairs(args.pairs)]


def output_files(out: Path, ids: str | None) -> tuple[Path, Path]:
    """The ids and skip-report files of an output, named after its full name: ``photos.npy`` and
    ``photos.safetensors`` side by side each keep their own (``photos.npy.ids.jsonl``, ...)."""
    return (Path(ids) if ids else out.with_name(out.name + ".ids.jsonl")), out.with_name(out.name + ".skipped.jsonl")


class _ItemRejections(logging.Filter):
    """Passes every record but the engine's "skipped <InputError>" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .errors import InputError

        return not (isinstance(record.args, tuple) and record.args and isinstance(record.args[0], InputError))


@contextlib.contextmanager
def items_reported_here():
    """While a verb reports the rejected items itself, drop the engine's own log line for each one, so that every
    rejection is reported once."""
    engine_log, drop = logging.getLogger("e5v.encoder"), _ItemRejections()
    engine_log.addFilter(drop)
    try:
        yield
    finally:
        engine_log.removeFilter(drop)


def run_embed(args) -> int:
    import numpy as np

    from .encoder import Item
    from .parts import PartStore, atomic_save, atomic_write_bytes

    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        print(f"e5v embed: error: --out must end in .npy or .safetensors, not {out.name!r}", file=sys.stderr)
        return 2
    ids_out, skipped_out = output_files(out, args.ids)
    records = read_records(args)
    prompt = default_prompt(args)
    items = [Item(text=r.text, image=r.image, name=name) for _, r, name in records]
    fingerprint = {"model": args.model, "adapter": args.adapter, "prompt": prompt, "dtype": args.dtype,
                   "chat_format": args.chat_format, "max_length": args.max_length, "part_size": args.part_size,
                   "anyres_max_tiles": args.anyres_max_tiles,
                   "inputs": hashlib.sha256(json.dumps([[i, r.text, r.image] for i, r, _ in records]).encode())
                   .hexdigest()}
    parts_dir = out.parent / f".{out.name}.parts"
    store = PartStore(parts_dir, fingerprint)
    nparts = (len(items) + args.part_size - 1) // args.part_size
    todo = [k for k in range(nparts) if not store.done(k)]
    embedded_now, seconds, model = 0, 0.0, None
    if todo or not items:  # no items: the model still says how wide the (0, dim) output is
        model = load_model(args)
    if todo:
        started = time.perf_counter()  # throughput of embedding, not of loading the model
        from tqdm.auto import tqdm

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
                embedded_now += len(res)
                bar.update(len(chunk))
        bar.close()
        seconds = time.perf_counter() - started

    parts = [store.read(k) for k in range(nparts)]
    dim = parts[0]["vectors"].shape[1] if parts else model.dim  # a part without rows still has its width
    vectors = np.concatenate([p["vectors"] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    vectors = vectors.astype(np.float16 if args.precision == "float16" else np.float32)
    indices = np.concatenate([p["indices"] for p in parts]).tolist() if parts else []
    skipped = [(int(i), str(r)) for p in parts for i, r in zip(p["skipped"], p["reasons"])]

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


# --- main -----------------------------------------------------------------------------------------------------
#: Modules that add verbs: each has ``add_parsers(sub)``, and imports nothing heavy at module level (the
#: parser is built on every call, so ``e5v --help`` stays fast).
VERB_MODULES: tuple[str, ...] = ("e5v.toyworld.demo", "e5v.serve.cli", "e5v.store.cli", "e5v.train.cli", "e5v.bench",
                                 "e5v.eval.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="e5v", description="E5-V universal multimodal embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    embed_parser(sub)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def describe_error(err: BaseException) -> str:
    """One line for an error e5v did not raise on purpose (disk full, permission denied, a library's bug)."""
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else str(f)
                            for f in (err.filename, err.filename2) if f is not None)
        return f"{err.strerror}{f': {where}' if where else ''}"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}{f': {first}' if first else ''} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 in a message must not end the run
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from .errors import E5VError

    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at exit
        return status
    except KeyboardInterrupt:
        print(f"e5v {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went into `head` & co., which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as err:  # noqa: BLE001 -- every error ends with one line and status 1, not a traceback
        if args.debug:
            traceback.print_exc()
        message = str(err) if isinstance(err, E5VError) else describe_error(err)
        print(f"e5v {args.verb}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
