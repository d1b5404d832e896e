"""``e5v index build|add|ann|info|verify|repair`` and ``e5v search``: the index verbs. Nothing heavy is imported at
module level."""
from __future__ import annotations

import json
import os
import sys

from ..cli import EXIT_SKIPPED, add_model_args, load_model
from ..errors import safe_text

PQ_NOTE = ("Scalar quantisation only: product quantisation (PQ) loses the structure that separates a text query "
           "from image vectors, and cross-modal recall suffers (clip-retrieval#76).")


def add_parsers(sub) -> None:
    p = sub.add_parser("index", help="build an on-disk vector index of images and texts, add to it",
                       description="Build, extend and inspect an index folder (resumable, partitioned).")
    verbs = p.add_subparsers(dest="index_verb", required=True, metavar="ACTION")

    b = verbs.add_parser("build", help="embed a collection into a new index folder",
                         description="Embed SOURCE into a new index at --out. SOURCE: a folder of images "
                                     "(recursive), a glob, a .jsonl/.csv/.parquet manifest (id, image or path or text, "
                                     "other fields kept as metadata), or WebDataset .tar shards (a file, a glob, "
                                     "a {000..009} list, or a folder of shards). Rerun the same command after an "
                                     "interruption to resume; under torchrun each rank embeds its share.")
    b.add_argument("source")
    b.add_argument("--out", required=True, help="index folder (new or empty)")
    add_model_args(b)
    b.add_argument("--task", help="cirr or fashioniq-{dress,shirt,toptee}: index images with the gallery prompt "
                                  "of that composed-retrieval task")
    b.add_argument("--image-prompt", help="your own image prompt (with <image>)")
    b.add_argument("--text-prompt", help="your own text prompt (with <sent>)")
    b.add_argument("--precision", choices=["float32", "float16"], default="float32", help="stored vectors")
    _add_job_args(b)
    b.add_argument("--ann", choices=["hnsw"], help="also build the approximate index when done")
    _add_ann_args(b)
    b.set_defaults(run=run_build)

    a = verbs.add_parser("add", help="append new items to an index",
                         description="Embed the items of SOURCE that the index does not hold yet, with the "
                                     "index's model and prompts. Image files get ids relative to the folder the "
                                     "index was built from, or absolute ones outside it; an id the index gives to "
                                     "another item is refused. Items changed since they were indexed are reported "
                                     "(--update re-embeds them). Resumable like build; extends the approximate "
                                     "index if there is one.")
    a.add_argument("index")
    a.add_argument("source")
    a.add_argument("--update", action="store_true",
                   help="re-embed items whose file (size, mtime) or text changed since they were indexed")
    add_model_args(a, model_required=False)
    _add_job_args(a)
    a.set_defaults(run=run_add)

    v = verbs.add_parser("verify", help="check every file of an index against its manifest and checksums",
                         description="Check every partition (shape, sizes, sha256 of vectors and rows, rows), the "
                                     "approximate index, and stray files. Exit status 1 names the damage.")
    v.add_argument("index")
    v.add_argument("--write", action="store_true", help="record checksums for partitions that have none (an "
                                                        "index written by an older e5v)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(run=run_verify)

    r = verbs.add_parser("repair", help="re-embed only the damaged partitions of an index",
                         description="Re-embed the partitions that `e5v index verify` finds damaged (from their "
                                     "rows, or from the recorded source), remove stray files, rebuild a damaged "
                                     "approximate index. Each partition is switched in atomically; rerun after an "
                                     "interruption.")
    r.add_argument("index")
    add_model_args(r, model_required=False)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(run=run_repair)

    n = verbs.add_parser("ann", help="build the approximate (HNSW) index and report its recall@10",
                         description="Build a faiss HNSW index over the stored vectors and measure its recall@10 "
                                     "against exact search. " + PQ_NOTE)
    n.add_argument("index")
    _add_ann_args(n)
    n.set_defaults(run=run_ann)

    i = verbs.add_parser("info", help="print an index's description as JSON")
    i.add_argument("index")
    i.set_defaults(run=run_info)

    s = sub.add_parser("search", help="search an index by text, image, or image + modification text",
                       description="Top-k items of an index for a text, an image (--image), or an image with a "
                                   "modification text (composed). The query is embedded with the index's model.")
    s.add_argument("index")
    s.add_argument("query", nargs="?", help="query text (or the modification text with --image)")
    s.add_argument("--text", help="query or modification text (same as the positional QUERY)")
    s.add_argument("--image", help="query image file")
    s.add_argument("--task", default="cirr", help="composed query prompt for --image with a text "
                                                  "(cirr, fashioniq-{dress,shirt,toptee}; default cirr)")
    s.add_argument("-k", "--top-k", type=int, default=10)
    s.add_argument("--exact", action="store_true", help="exact search even if an approximate index exists")
    s.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    add_model_args(s, model_required=False)
    s.set_defaults(run=run_search)


def _add_job_args(p) -> None:
    p.add_argument("--part-size", type=int, default=1024, help="items per partition (the unit of resuming)")
    p.add_argument("--no-progress", action="store_true")


def _add_ann_args(p) -> None:
    p.add_argument("--ann-dtype", choices=["int8", "float16", "float32"], default="int8",
                   help="HNSW vector codes (scalar quantiser). " + PQ_NOTE)
    p.add_argument("--ann-m", type=int, default=32, help="HNSW neighbours per node")
    p.add_argument("--ann-ef-construction", type=int, default=200)
    p.add_argument("--ann-ef-search", type=int, default=128)
    p.add_argument("--ann-queries", help=".npy of query vectors for the recall measurement (e.g. text vectors "
                                         "from `e5v embed --texts` for an image index); default: 1000 stored vectors")


# --- helpers ------------------------------------------------------------------------------------------------
def _checkpoint_path(name: str | None) -> str | None:
    """Local directories are recorded absolute, so the index works from any folder; hub ids as given."""
    return os.path.abspath(name) if name and os.path.isdir(name) else name


#: model options that change the vectors; recorded in the manifest, reused by `add` and `search`
MODEL_SETTINGS = ("model", "adapter", "chat_format", "max_length", "anyres_max_tiles")


def _fill_model_args(args, manifest: dict) -> None:
    """Model options not given on the command line come from the index."""
    for key in MODEL_SETTINGS:
        if getattr(args, key, None) is None:
            setattr(args, key, manifest.get(key))


def _model_settings(args) -> dict:
    """The MODEL_SETTINGS given on the command line (checkpoint folders made absolute)."""
    given = {key: getattr(args, key, None) for key in MODEL_SETTINGS}
    return {**given, "model": _checkpoint_path(given["model"]), "adapter": _checkpoint_path(given["adapter"])}


def _settings(args) -> dict:
    from .. import prompts

    image = args.image_prompt or prompts.image_prompt(args.task)
    return {**_model_settings(args), "prompt": {"image": image, "text": args.text_prompt or prompts.TEXT},
            "dtype": args.precision}


def _read_entries(source: str, *, rebase: bool, root: str | None):
    from ..errors import InputError
    from .sources import read_source

    entries = read_source(source, rebase=rebase, root=root)
    if not entries:
        raise InputError(source, "no items to index")
    return entries


def _run_job(args, folder: str, settings: dict, *, add: bool, root: str | None = None) -> int:
    from .build import Ranks, run_job

    ranks = Ranks()
    ranks.start()
    try:
        args.device = ranks.device(args.device)
        entries = _read_entries(args.source, rebase=add, root=root)
        source = os.path.abspath(args.source)  # recorded: `index repair` reads it again from any folder
        summary = run_job(folder, entries, settings, add=add, part_size=args.part_size, source=source,
                          load_model=lambda: load_model(args), progress=not args.no_progress, ranks=ranks,
                          root=None if add or not os.path.isdir(args.source) else source,
                          update=getattr(args, "update", False))
        status = _report(args, folder, summary, add=add) if ranks.rank == 0 else 0
        ranks.barrier()  # the ranks leave the process group together (an early leaver can abort a peer's gloo)
        return status
    finally:
        ranks.stop()


def _report(args, folder: str, summary, *, add: bool) -> int:
    m = summary.manifest
    if summary.finished_before:
        print(f"{folder} already holds this build ({m['count']} items); nothing to do. "
              f"Use `e5v index add {folder} SOURCE` for new items")
        return 0
    for s in summary.skipped[:20]:
        print(f"skipped {safe_text(s['item'])}: {safe_text(s['reason'])}", file=sys.stderr)
    if len(summary.skipped) > 20:
        print(f"... and {len(summary.skipped) - 20} more", file=sys.stderr)
    if summary.changed and not getattr(args, "update", False):
        for _, _, e in summary.changed[:20]:
            print(f"changed since indexed: {safe_text(e.label)}", file=sys.stderr)
        print(f"{len(summary.changed)} item(s) changed since they were indexed; `e5v index add {folder} "
              f"{args.source} --update` re-embeds them", file=sys.stderr)
    ann_line = ""
    if (m.get("ann") or getattr(args, "ann", None)) and m["count"]:
        from .ann import build_ann

        info = build_ann(folder, update=True) if add else build_ann(folder, **_ann_options(args))
        ann_line = _ann_line(info)
    rate = (f"{summary.embedded / summary.seconds:.1f} items/s" if summary.embedded and summary.seconds > 0
            else "nothing left to embed")
    known = f", {summary.known} already in the index" if add else ""
    if summary.changed and getattr(args, "update", False):
        known += f", {summary.updated} changed re-embedded"
    elif summary.changed:
        known += f", {len(summary.changed)} changed (not updated)"
    resumed = f", {summary.resumed_parts} partitions resumed" if summary.resumed_parts else ""
    skipped = (f", skipped {len(summary.skipped)} (see {os.path.join(folder, 'skipped.jsonl')})"
               if summary.skipped else ", skipped 0")
    print(f"{'added to' if add else 'built'} {folder}: {m['count']} items ({m['counts']['image']} images, "
          f"{m['counts']['text']} texts) in {len(m['partitions'])} partitions, dim {m['dim']}; this job: "
          f"{summary.items} items{known}{skipped}{resumed}; {rate}{ann_line}")
    return EXIT_SKIPPED if summary.skipped else 0


def _ann_options(args) -> dict:
    import numpy as np

    queries = np.load(args.ann_queries) if args.ann_queries else None
    return {"dtype": args.ann_dtype, "m": args.ann_m, "ef_construction": args.ann_ef_construction,
            "ef_search": args.ann_ef_search, "queries": queries}


def _ann_line(info: dict) -> str:
    return (f"; ann: HNSW {info['dtype']} M={info['m']}, recall@10 {info['recall_at_10']:.3f} vs exact "
            f"({info['recall_queries']} queries: {info['recall_query_source']})")


# --- verbs --------------------------------------------------------------------------------------------------
def run_build(args) -> int:
    return _run_job(args, args.out, _settings(args), add=False)


def run_add(args) -> int:
    from ..errors import ConfigError
    from .layout import read_manifest

    manifest = read_manifest(args.index)
    if manifest is None:
        raise ConfigError(f"{args.index}: no index there (no manifest.json); create one with `e5v index build`")
    given = _model_settings(args)
    _fill_model_args(args, manifest)
    settings = {**{k: manifest.get(k) for k in (*MODEL_SETTINGS, "prompt", "dtype")},
                **{k: v for k, v in given.items() if v is not None}}
    from .build import index_root

    return _run_job(args, args.index, settings, add=True, root=index_root(manifest))


def run_verify(args) -> int:
    from .repair import verify, write_checksums

    if args.write:
        n = write_checksums(args.index)
        print(f"recorded checksums of {n} partitions", file=sys.stderr)
    report = verify(args.index, progress=not args.no_progress)
    for line in report.lines():
        print(line)
    if report.unchecked:
        print(f"{len(report.unchecked)} partitions have no checksums (written by an older e5v): their shapes, sizes "
              f"and rows were checked; `e5v index verify {args.index} --write` records checksums", file=sys.stderr)
    damaged = [*report.partitions, *(["ann"] if report.ann else []), *(p.name for p in report.stray)]
    print(f"verified {args.index}: {report.count} items, "
          f"{'damaged: ' + ', '.join(damaged) if damaged else 'no damage found'}", file=sys.stderr)
    return 1 if damaged else 0


def run_repair(args) -> int:
    from .layout import read_manifest
    from .repair import repair

    manifest = read_manifest(args.index)
    if manifest is None:
        from ..errors import ConfigError

        raise ConfigError(f"{args.index}: no index there (no manifest.json)")
    _fill_model_args(args, manifest)
    report, skipped = repair(args.index, lambda: load_model(args), progress=not args.no_progress)
    for s in skipped[:20]:
        print(f"skipped {safe_text(s['item'])}: {safe_text(s['reason'])}", file=sys.stderr)
    if report.ok:
        print(f"{args.index}: no damage found; nothing to repair")
        return 0
    print(f"repaired {args.index}: re-embedded {len(report.partitions)} partitions"
          f"{' (' + ', '.join(report.partitions) + ')' if report.partitions else ''}, removed "
          f"{len(report.stray)} stray files{', rebuilt the approximate index' if report.ann else ''}")
    return EXIT_SKIPPED if skipped else 0


def run_ann(args) -> int:
    from .ann import build_ann

    info = build_ann(args.index, **_ann_options(args))
    print(f"built the approximate index of {args.index}{_ann_line(info)}")
    return 0


def run_info(args) -> int:
    from . import open_index

    print(json.dumps(open_index(args.index).info, indent=1))
    return 0


def run_search(args) -> int:
    from . import embed_query, open_index
    from .layout import json_line

    if args.query is not None and args.text is not None:
        print("e5v search: error: give the text either as QUERY or with --text, not both", file=sys.stderr)
        return 2
    text = args.query if args.query is not None else args.text
    if text is None and args.image is None:
        print("e5v search: error: give a query text, --image FILE, or both", file=sys.stderr)
        return 2
    index = open_index(args.index)
    _fill_model_args(args, index.manifest)
    with load_model(args) as model:
        query = embed_query(model, index.info, text=text, image=args.image, task=args.task)
    hits = index.search(query[None], args.top_k, exact=args.exact)[0]
    mode = "exact" if args.exact or not index.info["ann"] else "hnsw"
    if args.json:
        print(json_line({"index": index.info["path"], "model": args.model, "search": mode,
                          "query": {"text": text, "image": args.image and os.path.abspath(args.image),
                                    "task": args.task if text is not None and args.image else None},
                          "results": [{"rank": r, "id": h.id, "score": h.score, "meta": h.meta}
                                      for r, h in enumerate(hits, 1)]}))
        return 0
    for r, h in enumerate(hits, 1):
        meta = dict(h.meta)
        if meta.pop("kind") == "text":
            what = repr(meta.pop("text"))
        else:
            what = meta.pop("image") or f"{meta.pop('shard')}:{meta.pop('member')}"
        extra = f"  {json_line(meta)}" if meta else ""
        print(f"{r:3d}  {h.score:+.4f}  {safe_text(h.id)}  {safe_text(what)}{extra}")
    print(f"{len(hits)} of {index.count} items ({mode} search, {index.info['model']})", file=sys.stderr)
    return 0

