"""``e5v eval TASK... --model M --data DIR``: the paper's benchmarks, a JSON result and a markdown table beside
the paper's numbers.  Imports nothing heavy at module level (the parser is built on every ``e5v`` call)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

TASK_HELP = """tasks: flickr30k coco cirr cirr-test fashioniq fashioniq-{dress,shirt,toptee} i2i-flickr30k i2i-coco
sts12 sts13 sts14 sts15 sts16 sts-b sick-r; groups: sts (the seven STS tasks), paper (every task of the paper
except cirr-test). Data layout under --data: see docs/evaluation.md or any error message."""


def add_parsers(sub) -> None:
    from .common import add_model_args, count

    p = sub.add_parser("eval", help="run the paper's benchmarks (retrieval, composed retrieval, I2I, STS)",
                       description="Evaluate a model on E5-V's benchmarks with the official protocols. "
                                   "Writes OUT/results.json and OUT/results.md (each number beside the paper's).",
                       epilog=TASK_HELP)
    p.add_argument("tasks", nargs="+", metavar="TASK", help="benchmark(s) to run")
    add_model_args(p)
    p.add_argument("--data", required=True, help="data root: DATA/flickr30k, DATA/coco, DATA/cirr, DATA/fashioniq, "
                                                 "DATA/senteval")
    p.add_argument("--out", default="eval-results", help="output folder (default: eval-results)")
    p.add_argument("--cache", help="embedding cache folder (default: OUT/cache)")
    p.add_argument("--limit", type=count(), help="quick look: the first N images / queries / pairs of each set")
    p.add_argument("--font", help="TrueType font for the I2I captions (default: Liberation Sans, "
                                  "metric-compatible with the official Arial)")
    p.add_argument("--part-size", type=count(), default=256, help="items per cached, resumable part")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from .common import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, engine_config, items_reported_here, load_model
    from ..eval import report, tasks
    from ..eval.cache import EmbeddingCache

    names = tasks.expand(args.tasks)
    data = Path(args.data)
    if not data.is_dir():
        print(f"e5v eval: error: --data {data}: no such folder", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    # what the vectors depend on keys the cache: a re-trained checkpoint in the same folder is another model
    settings = engine_config(args, **tasks.ENGINE_OPTIONS).vector_settings()
    loaded = []

    def model():
        if not loaded:
            loaded.append(load_model(args, **tasks.ENGINE_OPTIONS))
        return loaded[0]

    cache = EmbeddingCache(Path(args.cache) if args.cache else out / "cache", settings, model,
                           part_size=args.part_size, progress=not args.no_progress)
    ctx = tasks.Context(data=data, cache=cache, out=out, limit=args.limit, font=args.font)
    tasks.check(ctx, names)  # every dataset present and well formed before anything is embedded
    header = {"model": args.model, "adapter": args.adapter, "dtype": settings["dtype"], "chat_format": args.chat_format,
              "limit": args.limit}
    results = _previous(out / "results.json", header)
    started = time.perf_counter()
    computed, skipped = 0, 0
    with items_reported_here():  # the cache reports each rejected item, from this run or from cached parts
        for name in names:
            res = tasks.TASKS[name](ctx)
            computed += res.computed
            skipped += sum(res.skipped.values())
            results["tasks"][name] = res.to_json()
            js, md = report.write(out, results)  # after every task: a later failure keeps what is done
    print(report.markdown({**results, "tasks": {n: results["tasks"][n] for n in names}}), end="")
    seconds = time.perf_counter() - started
    cached = "all embeddings from the cache" if not computed else f"embedded {computed} items"
    print(f"evaluated {len(names)} task(s) in {seconds:.1f}s ({cached}); skipped items: {skipped}; "
          f"results -> {js}, {md}")
    return EXIT_SKIPPED if skipped else EXIT_OK


def _previous(path: Path, header: dict) -> dict:
    """Results of earlier runs with the same model and settings are kept; other runs are replaced."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        same = isinstance(old, dict) and all(old.get(k) == v for k, v in header.items())
        if same and isinstance(old.get("tasks"), dict):
            return old
    return {**header, "e5v": _version(), "tasks": {}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("e5v")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"
