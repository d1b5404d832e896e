"""``e5v index build|add|ann|info|verify|repair|evaluate|export`` and ``e5v search``: the index verbs, over
:mod:`e5v.store`'s and :mod:`e5v.vectors`' Python API (``build_index``, ``add_to_index``, ``repair``,
``recall_rows``, ``export_vectors``, ...). Nothing heavy is imported at module level."""
from __future__ import annotations

import json
import os
import sys

from .common import EXIT_SKIPPED, add_model_args, engine_config
from ..errors import safe_text

FROM_INDEX = ("Model options not given are the index's, so that the new vectors are made as the stored ones were; "
              "one that differs from the index's is refused. --dtype auto is this machine's choice: a compute dtype "
              "or checkpoint files other than those the index recorded are warned about.")
PQ_NOTE = ("Scalar quantisation only: product quantisation (PQ) loses the structure that separates a text query "
           "from image vectors, and cross-modal recall suffers.")


def add_parsers(sub) -> None:
    p = sub.add_parser("index", help="build an on-disk vector index of images and texts, add to it",
                       description="Build, extend and inspect an index folder (resumable, partitioned).")
    verbs = p.add_subparsers(dest="index_verb", required=True, metavar="ACTION")
    for add in (_add_build, _add_add, _add_verify, _add_repair, _add_ann, _add_info, _add_evaluate, _add_export):
        add(verbs)
    _add_search(sub)


def _add_build(verbs) -> None:
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
    b.add_argument("--precision", choices=["float32", "float16", "int8", "binary"], default="float32",
                   help="stored vectors; int8 (calibrated ranges) or binary (sign bits): search codes scanned in "
                        "their place, with the vectors kept in float16 to re-score the top candidates exactly "
                        "(`e5v index evaluate` measures what each setting costs)")
    b.add_argument("--dims", type=int, help="search codes of this many dimensions: a PCA fitted on a sample of the "
                                            "index, applied to every query (the vectors' width or more: no PCA, "
                                            "and with float32 or float16 no search codes)")
    _add_job_args(b)
    b.add_argument("--ann", choices=["hnsw"], help="also build the approximate index when done")
    _add_ann_args(b)
    b.set_defaults(run=run_build)


def _add_add(verbs) -> None:
    a = verbs.add_parser("add", help="append new items to an index",
                         description="Embed the items of SOURCE that the index does not hold yet, with the "
                                     "index's model and prompts. Image files get ids relative to the folder the "
                                     "index was built from, or absolute ones outside it; an id the index gives to "
                                     "another item is refused. Items changed since they were indexed are reported "
                                     "(--update re-embeds them). Resumable like build; extends the approximate "
                                     "index if there is one. " + FROM_INDEX)
    a.add_argument("index")
    a.add_argument("source")
    a.add_argument("--update", action="store_true",
                   help="re-embed items whose file (size, mtime) or text changed since they were indexed")
    add_model_args(a, model_required=False)
    _add_job_args(a)
    a.set_defaults(run=run_add)


def _add_verify(verbs) -> None:
    v = verbs.add_parser("verify", help="check every file of an index against its manifest and checksums",
                         description="Check every partition (shape, sizes, sha256 of vectors and rows, rows), the "
                                     "approximate index, and stray files. Exit status 1 names the damage.")
    v.add_argument("index")
    v.add_argument("--write", action="store_true", help="record checksums for partitions that have none (an "
                                                        "index written by an older e5v)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(run=run_verify)


def _add_repair(verbs) -> None:
    r = verbs.add_parser("repair", help="re-embed only the damaged partitions of an index",
                         description="Re-embed the partitions that `e5v index verify` finds damaged (from their "
                                     "rows, or from the recorded source), remove stray files, rebuild a damaged "
                                     "approximate index. Each partition is switched in atomically; rerun after an "
                                     "interruption. " + FROM_INDEX)
    r.add_argument("index")
    add_model_args(r, model_required=False)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(run=run_repair)


def _add_ann(verbs) -> None:
    n = verbs.add_parser("ann", help="build the approximate (HNSW) index and report its recall@10",
                         description="Build a faiss HNSW index over the stored vectors and measure its recall@10 "
                                     "against exact search. " + PQ_NOTE)
    n.add_argument("index")
    _add_ann_args(n)
    n.set_defaults(run=run_ann)


def _add_info(verbs) -> None:
    i = verbs.add_parser("info", help="print an index's description as JSON")
    i.add_argument("index")
    i.set_defaults(run=run_info)


def _add_evaluate(verbs) -> None:
    e = verbs.add_parser("evaluate", help="recall of every storage setting against exact float32 search",
                         description="Recall@1 and recall@10 of each storage setting (precision x dimensions x "
                                     "re-scoring) against exact float32 search over the index's stored vectors, for "
                                     "each query set (vector files from `e5v embed`, e.g. text vectors for an image "
                                     "index, composed-query vectors). Prints a markdown table.")
    e.add_argument("index")
    e.add_argument("--queries", nargs="+", required=True, metavar="[NAME=]FILE",
                   help="query vectors (.npy or .safetensors); NAME defaults to the file's name")
    e.add_argument("--dims", type=int, nargs="*", default=[], help="PCA sizes to try besides the full width")
    e.add_argument("--precisions", nargs="+", choices=["float32", "float16", "int8", "binary"],
                   default=["float32", "float16", "int8", "binary"])
    e.add_argument("--out", help="also write the table (markdown) here, and the rows as JSON beside it")
    e.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    e.set_defaults(run=run_evaluate)


def _add_export(verbs) -> None:
    x = verbs.add_parser("export", help="write ids, metadata and vectors for vector databases (Parquet, Lance)",
                         description="Export the index as one table: id, metadata columns (kind, image or text, "
                                     "the items' own fields) and vector (fixed-size list of floats), as a Parquet "
                                     "file (pyarrow, DuckDB, LanceDB, Qdrant and Milvus importers read it) or a Lance "
                                     "dataset (LanceDB's format; needs pylance).")
    x.add_argument("index")
    x.add_argument("out", help="the Parquet file, or the Lance dataset's folder")
    x.add_argument("--format", choices=["parquet", "lance"], default="parquet")
    x.add_argument("--precision", choices=["float32", "float16"],
                   help="of the exported vectors (default: the index's stored precision)")
    x.set_defaults(run=run_export)


def _add_search(sub) -> None:
    s = sub.add_parser("search", help="search an index by text, image, or image + modification text",
                       description="Top-k items of an index for a text, an image (--image), or an image with a "
                                   "modification text (composed). The query is embedded with the index's model "
                                   "(model options not given are the index's; --dtype auto: this machine's).")
    s.add_argument("index")
    s.add_argument("query", nargs="?", help="query text (or the modification text with --image)")
    s.add_argument("--text", help="query or modification text (same as the positional QUERY)")
    s.add_argument("--image", help="query image file")
    s.add_argument("--task", default="cirr", help="composed query prompt for --image with a text "
                                                  "(cirr, fashioniq-{dress,shirt,toptee}; default cirr)")
    s.add_argument("-k", "--top-k", type=int, default=10)
    s.add_argument("--exact", action="store_true",
                   help="exact search over the stored vectors even if the index has search codes or an approximate "
                        "index")
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
def _report(args, folder: str, summary, *, add: bool) -> int:
    """The summary of a build or add (on rank 0 only)."""
    m = summary.manifest
    if summary.finished_before:
        print(f"{folder} already holds this build ({m['count']} items); nothing to do. "
              f"Use `e5v index add {folder} SOURCE` for new items{_codes_line(summary.codes) if summary.codes else ''}")
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
          f"{summary.items} items{known}{skipped}{resumed}; {rate}{_ann_line(summary.ann) if summary.ann else ''}"
          f"{_codes_line(summary.codes) if summary.codes else ''}")
    return EXIT_SKIPPED if summary.skipped else 0


def _ann_options(args) -> dict:
    import numpy as np

    queries = np.load(args.ann_queries) if args.ann_queries else None
    return {"dtype": args.ann_dtype, "m": args.ann_m, "ef_construction": args.ann_ef_construction,
            "ef_search": args.ann_ef_search, "queries": queries}


def _ann_line(info: dict) -> str:
    return (f"; ann: HNSW {info['dtype']} M={info['m']}, recall@10 {info['recall_at_10']:.3f} vs exact "
            f"({info['recall_queries']} queries: {info['recall_query_source']})")


def _codes_line(entry: dict) -> str:
    dims = f"{entry['dims']} dims (PCA, {100 * entry['kept_variance']:.1f} % of the variance)" if entry.get("dims") \
        else "full width"
    return f"; search codes: {entry['precision']}, {dims}, re-scored from the stored vectors"


def read_vectors(path: str):
    """float32 vectors from a .npy or .safetensors file (as `e5v embed` writes them); codes (int8, binary) are
    refused with what to do instead."""
    import numpy as np

    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
        vectors = tensors.get("embeddings", next(iter(tensors.values()), None))
    else:
        vectors = np.load(path, allow_pickle=False)
    if vectors is not None and vectors.ndim == 2 and vectors.dtype.kind in "iu":
        raise ValueError(f"{path}: holds {vectors.dtype} codes (as `e5v embed --precision int8|binary` writes "
                         "them), not vectors; evaluate needs float32 or float16 query vectors: embed the queries "
                         "without --precision int8|binary")
    if vectors is None or vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise ValueError(f"{path}: expected a (n, dim) float array of vectors")
    return vectors.astype(np.float32)


# --- verbs --------------------------------------------------------------------------------------------------
def run_build(args) -> int:
    from ..store import build_index

    summary = build_index(args.source, args.out, config=engine_config(args), precision=args.precision,
                          dims=args.dims, task=args.task, image_prompt=args.image_prompt, text_prompt=args.text_prompt,
                          part_size=args.part_size, ann=_ann_options(args) if args.ann else None,
                          progress=not args.no_progress)
    return _report(args, args.out, summary, add=False) if summary.rank == 0 else 0


def run_add(args) -> int:
    from ..store import add_to_index

    summary = add_to_index(args.index, args.source, config=engine_config(args), update=args.update,
                           part_size=args.part_size, progress=not args.no_progress)
    return _report(args, args.index, summary, add=True) if summary.rank == 0 else 0


def run_verify(args) -> int:
    from ..store.repair import verify, write_checksums

    if args.write:
        n = write_checksums(args.index)
        print(f"recorded checksums of {n} partitions", file=sys.stderr)
    report = verify(args.index, progress=not args.no_progress)
    for line in report.lines():
        print(line)
    if report.unchecked:
        print(f"{len(report.unchecked)} partitions have no checksums (written by an older e5v): their shapes, sizes "
              f"and rows were checked; `e5v index verify {args.index} --write` records checksums", file=sys.stderr)
    damaged = [*report.partitions, *(["ann"] if report.ann else []), *(["search codes"] if report.codes else []),
               *(p.name for p in report.stray)]
    print(f"verified {args.index}: {report.count} items, "
          f"{'damaged: ' + ', '.join(damaged) if damaged else 'no damage found'}", file=sys.stderr)
    return 1 if damaged else 0


def run_repair(args) -> int:
    from ..store.repair import repair

    report, skipped = repair(args.index, engine_config(args), progress=not args.no_progress)
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
    from ..store.ann import build_ann

    info = build_ann(args.index, **_ann_options(args))
    print(f"built the approximate index of {args.index}{_ann_line(info)}")
    return 0


def run_info(args) -> int:
    from ..store import open_index

    print(json.dumps(open_index(args.index).info, indent=1))
    return 0


def run_evaluate(args) -> int:
    from pathlib import Path

    from ..store import open_index
    from ..vectors import recall_rows, render_markdown
    from ..vectors.retrieval import Rows

    index = open_index(args.index)
    queries = {}
    for spec in args.queries:
        name, sep, path = spec.partition("=")
        if not (sep and name and "/" not in name and not os.path.isfile(spec)):  # no NAME=: all of it is the file
            name, path = Path(spec).name.split(".")[0], spec
        try:
            queries[name] = read_vectors(path)
        except (OSError, ValueError) as exc:
            print(f"e5v index evaluate: error: {exc}", file=sys.stderr)
            return 2
    stored = Rows(index.stored)  # read a chunk at a time; float16 partitions re-score candidates as they are
    rows = recall_rows(stored, queries, precisions=args.precisions, dims=[None, *args.dims],
                       full=stored if index.manifest["precision"] == "float16" else None)
    table = render_markdown(rows)
    if args.out:
        Path(args.out).write_text(table)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1) if args.json else table, end="" if not args.json else "\n")
    print(f"recall against exact float32 search over {index.count} stored vectors of {args.index}", file=sys.stderr)
    return 0


def run_export(args) -> int:
    from ..store import open_index
    from ..store.index import row_meta
    from ..vectors import export_vectors
    from ..vectors.retrieval import Rows

    index = open_index(args.index)
    rows = [row for i in range(len(index.parts)) for row in index.rows(i)]
    path = export_vectors(args.format, args.out, Rows(index.stored), [r["id"] for r in rows],
                          [row_meta(r) for r in rows], precision=args.precision or index.info["precision"])
    print(f"exported {len(rows)} items of {args.index} ({index.dim}-d, {args.precision or index.info['precision']}) "
          f"-> {path} ({args.format})")
    return 0


def run_search(args) -> int:
    from ..encoder import E5V
    from ..store import embed_query, open_index
    from ..store.indexing import index_config
    from ..store.layout import json_line

    if args.query is not None and args.text is not None:
        print("e5v search: error: give the text either as QUERY or with --text, not both", file=sys.stderr)
        return 2
    text = args.query if args.query is not None else args.text
    if text is None and args.image is None:
        print("e5v search: error: give a query text, --image FILE, or both", file=sys.stderr)
        return 2
    index = open_index(args.index)
    config = index_config(index.manifest, engine_config(args))
    with E5V.from_pretrained(config=config) as model:
        query = embed_query(model, index.info, text=text, image=args.image, task=args.task)
    hits = index.search(query[None], args.top_k, exact=args.exact)[0]
    mode = index.search_mode(args.exact)
    if mode == "codes":
        mode = f"{index.info['codes']['precision']} codes, re-scored"
    if args.json:
        print(json_line({"index": index.info["path"], "model": config.model, "search": mode,
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

