"""Storage precisions at scale: 1 M synthetic 4,096-d unit vectors (clustered around a shared offset, so that recall
means something and signs alone say little, as with real embeddings), and for each storage setting (float32,
float16, int8, int8 + re-scoring, binary, binary + re-scoring from the float16 copy): bytes per vector, resident
memory while searching, build time (encoding and writing the codes), query latency (p50 / p95 of single queries
and of batches of 64) of exact search over the memory-mapped codes, and recall@1 / recall@10 against exact float32
search over the same rows.

A setting whose codes would exceed ``--scan-budget-gb`` (float32 and float16 on a shared 23 GB machine) is measured
on the first rows that fit and extrapolated to the full size (exact search is linear in the rows scanned). The
report ends with the arithmetic for 100 M vectors.

    python benchmarks/index_scale.py                                   # 1 M vectors, files under /tmp
    python benchmarks/index_scale.py --n 100000 --folder /tmp/scale    # a quick run

Writes benchmarks/results/index_scale.json and .md (``--out``).
"""
import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  the codecs convert float16 / int8 chunks with torch: imported before RSS is measured

from e5v.vectors import make_codec, merge_topk, search, unit_rows
from e5v.vectors.retrieval import default_candidates

#: rows generated, encoded and written per step
CHUNK = 16384
K = 10
#: the generator key of the queries (collection chunks use their chunk number)
QUERY_KEY = 2**40
SETTINGS = (("float32", False), ("float16", False), ("int8", False), ("int8", True), ("binary", False),
            ("binary", True))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class World:
    """Clustered unit vectors, the same rows for the same (seed, start) whatever else was generated."""

    def __init__(self, dim: int, clusters: int, spread: float, offset: float, seed: int):
        rng = np.random.default_rng(seed)
        self.dim, self.spread, self.seed = dim, spread, seed
        self.centres = unit_rows(rng.standard_normal((clusters, dim), dtype=np.float32))
        self.mean = offset * unit_rows(rng.standard_normal((1, dim), dtype=np.float32))[0]

    def rows(self, key: int, m: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, key])
        x = rng.standard_normal((m, self.dim), dtype=np.float32)
        x *= self.spread / np.sqrt(self.dim)
        x += self.centres[rng.integers(0, len(self.centres), m)]
        x += self.mean
        return unit_rows(x)


class NpyWriter:
    """An ``.npy`` file of a known shape written row block by row block (plain writes: no memory map, so the
    process does not hold the written pages)."""

    def __init__(self, path: Path, shape: tuple, dtype):
        self.path, self.fh = path, open(path, "wb")
        np.lib.format.write_array_header_2_0(self.fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                       "fortran_order": False, "shape": shape})

    def write(self, rows: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(rows).tobytes())

    def close(self) -> None:
        self.fh.flush()
        self.fh.close()


def percentiles(times: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1000, 2),
            "p95_ms": round(float(np.percentile(times, 95)) * 1000, 2)}


def build(args, world: World, folder: Path, sizes: dict, queries: np.ndarray):
    """One pass over the collection: every setting's codes written (timed per setting), and the exact float32
    top-K of the queries over each measured prefix."""
    n = args.n
    sample = world.rows(0, min(CHUNK, n))
    codecs, writers, build_s = {}, {}, {}
    for precision in ("float32", "float16", "int8", "binary"):
        t = time.perf_counter()
        codecs[precision] = make_codec(precision, args.dim).fit(sample)
        writers[precision] = NpyWriter(folder / f"{precision}.npy", (writer_rows(precision, sizes, n),
                                                                     codecs[precision].code_width),
                                       codecs[precision].code_dtype)
        build_s[precision] = time.perf_counter() - t
    exact = make_codec("float32", args.dim)
    truth = {}
    best = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
    prefixes = sorted(set(sizes.values()))
    t_gen = 0.0
    for start in range(0, n, CHUNK):
        t = time.perf_counter()
        x = world.rows(start // CHUNK, min(CHUNK, n - start))  # chunk 0 is also the calibration sample
        t_gen += time.perf_counter() - t
        for precision, writer in writers.items():
            rows = writer_rows(precision, sizes, n)
            if start < rows:
                t = time.perf_counter()
                writer.write(codecs[precision].encode(x[:rows - start]))
                build_s[precision] += time.perf_counter() - t
        scores = exact.score(queries, x)
        top = np.argsort(-scores, axis=1)[:, :K]
        best = merge_topk(*best, np.take_along_axis(scores, top, 1), top + start, K)
        done = start + len(x)
        for p in prefixes:
            if p == done:
                truth[p] = best[1].copy()
        print(f"\r  built {done:,} / {n:,} rows", end="", flush=True)
    print()
    for precision, writer in writers.items():
        t = time.perf_counter()
        writer.close()
        build_s[precision] += time.perf_counter() - t
    return codecs, build_s, truth, t_gen


def writer_rows(precision: str, sizes: dict, n: int) -> int:
    """Rows written for ``precision``: float16 is also the re-scoring copy, kept for all rows."""
    return n if precision == "float16" else sizes[(precision, False)]


def measure(args, folder: Path, codecs: dict, precision: str, rescore: bool, rows: int, queries, truth):
    """Latency and memory of one setting over its first ``rows`` rows, and its recall against exact search."""
    import gc

    gc.collect()
    base = rss_bytes()
    codes = np.load(folder / f"{precision}.npy", mmap_mode="r")[:rows]
    full = [np.load(folder / "float16.npy", mmap_mode="r")[:rows]] if rescore else None
    codec = codecs[precision]
    peak = 0

    def run(q):
        nonlocal peak
        t = time.perf_counter()
        _, pos = search(q, [codes], codec, K, full=full)
        elapsed = time.perf_counter() - t
        peak = max(peak, rss_bytes() - base)
        return elapsed, pos

    run(queries[:1])  # touch the codes once: latency below is with the codes in memory (page cache)
    single = [run(queries[i:i + 1])[0] for i in range(args.single)]
    batches, found = [], None
    for _ in range(args.batches):
        elapsed, found = run(queries)
        batches.append(elapsed)
    want = truth[rows]
    recall1 = float(np.mean(found[:, 0] == want[:, 0]))
    recall10 = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, want)]))
    return {"precision": precision, "rescore": rescore, "rows_measured": rows,
            "bytes_per_vector": codec.bytes_per_vector, "rescore_copy_bytes_per_vector": 2 * args.dim if rescore else 0,
            "codes_bytes": codec.bytes_per_vector * rows, "rss_while_searching_bytes": int(peak),
            "single": percentiles(single), "batch64": percentiles(batches),
            "recall@1": round(recall1, 4), "recall@10": round(recall10, 4)}


def extrapolate(row: dict, n: int) -> dict:
    """The row's figures for ``n`` rows: sizes and scan times grow linearly with the rows scanned."""
    f = n / row["rows_measured"]
    return {"rows": n, "codes_bytes": row["bytes_per_vector"] * n,
            "rescore_copy_bytes": row["rescore_copy_bytes_per_vector"] * n,
            "single_p50_ms": row["single"]["p50_ms"] * f, "batch64_p50_ms": row["batch64"]["p50_ms"] * f,
            "factor": f}


def gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB" if b >= 1e8 else f"{b / 1e6:,.1f} MB"


def render(report: dict) -> str:
    n = report["n"]
    lines = [f"### Exact search over {n:,} synthetic {report['dim']}-d vectors, one storage setting at a time",
             "",
             f"{report['machine']}, load average {report['load_average'][0]:.1f} before the measurements and "
             f"{report['load_average'][1]:.1f} after (other people's processes); exact top-{K} over memory-mapped "
             "codes with the codes in the page cache; "
             f"re-scoring reads the top {default_candidates(K)} candidates' rows from the float16 copy "
             "(memory-mapped). "
             "Recall against exact float32 search over the same rows, "
             f"{report['queries']} queries. Rows marked * were measured on fewer rows (their codes exceed the "
             f"{report['scan_budget_gb']} GB scan budget) and scaled linearly to {n:,} (exact search is linear in "
             "the rows scanned). RSS counts the mapped pages of the codes and, with re-scoring, the pages of the "
             "float16 copy that the kernel read ahead around the candidates (page cache, reclaimable).",
             "",
             "| setting | bytes/vector (+ copy) | rows measured | build (s) | RSS searching | single p50 / p95 (ms) "
             f"| batch of 64 p50 / p95 (ms) | at {n:,}: single p50 / batch p50 (ms) | R@1 | R@10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        name = r["precision"] + (" + re-scoring" if r["rescore"] else "")
        extra = f" (+ {r['rescore_copy_bytes_per_vector']:,})" if r["rescore"] else ""
        x = extrapolate(r, n)
        star = "*" if r["rows_measured"] < n else ""
        lines.append(f"| {name} | {r['bytes_per_vector']:,}{extra} | {r['rows_measured']:,}{star} | "
                     f"{r['build_s']:.1f} | {gb(r['rss_while_searching_bytes'])} | "
                     f"{r['single']['p50_ms']:,.0f} / {r['single']['p95_ms']:,.0f} | "
                     f"{r['batch64']['p50_ms']:,.0f} / {r['batch64']['p95_ms']:,.0f} | "
                     f"{x['single_p50_ms']:,.0f} / {x['batch64_p50_ms']:,.0f} | {r['recall@1']:.3f} | "
                     f"{r['recall@10']:.3f} |")
    lines += ["", "#### 100 M vectors, by arithmetic", "",
              "Memory for an exact scan = bytes/vector x 100 M; the float16 re-scoring copy stays on disk (only the "
              f"{default_candidates(K)} candidates' rows per query are read). Latency = the measured p50 x "
              "(100 M / rows measured): a scan reads every code once (one machine, these cores).", "",
              "| setting | codes in memory | float16 copy on disk | single query | batch of 64 |",
              "|---|---|---|---|---|"]
    for r in report["settings"]:
        name = r["precision"] + (" + re-scoring" if r["rescore"] else "")
        x = extrapolate(r, 100_000_000)
        f = f"{x['factor']:,.0f}"
        lines.append(f"| {name} | {r['bytes_per_vector']:,} B x 100 M = {gb(x['codes_bytes'])} | "
                     + (f"{2 * report['dim']:,} B x 100 M = {gb(x['rescore_copy_bytes'])}" if r["rescore"] else "-")
                     + f" | {r['single']['p50_ms']:,.0f} ms x {f} = {x['single_p50_ms'] / 1000:,.0f} s"
                     f" | {r['batch64']['p50_ms']:,.0f} ms x {f} = {x['batch64_p50_ms'] / 1000:,.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--spread", type=float, default=0.7, help="noise norm around a cluster centre (centre norm 1)")
    ap.add_argument("--offset", type=float, default=0.8, help="norm of the offset every vector shares")
    ap.add_argument("--queries", type=int, default=64, help="queries (the batch); single queries are the first")
    ap.add_argument("--single", type=int, default=20, help="single queries timed per setting")
    ap.add_argument("--batches", type=int, default=3, help="batches of all queries timed per setting")
    ap.add_argument("--scan-budget-gb", type=float, default=4.5,
                    help="largest codes a setting scans; larger ones are measured on fewer rows and extrapolated")
    ap.add_argument("--folder", type=Path, default=Path("/tmp/e5v-index-scale"), help="scratch folder for the codes")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "index_scale")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    world = World(args.dim, args.clusters, args.spread, args.offset, args.seed)
    queries = world.rows(QUERY_KEY, args.queries)
    sizes = {}
    for precision, rescore in SETTINGS:
        per = make_codec(precision, args.dim).bytes_per_vector
        fits = int(args.scan_budget_gb * 1e9 // per) // CHUNK * CHUNK
        sizes[(precision, rescore)] = min(args.n, max(fits, CHUNK))
    print(f"building {args.n:,} x {args.dim} in {args.folder}; rows per setting: "
          + ", ".join(f"{p}{'+rescore' if r else ''} {s:,}" for (p, r), s in sizes.items()))
    t0 = time.perf_counter()
    try:  # the scratch folder holds ~17 GB at the defaults: gone on any exit, unless --keep
        codecs, build_s, truth, t_gen = build(args, world, args.folder, sizes, queries)
        print(f"generated in {t_gen:.0f} s, built in {time.perf_counter() - t0:.0f} s")
        rows, load = [], os.getloadavg()[0]
        for precision, rescore in SETTINGS:
            r = measure(args, args.folder, codecs, precision, rescore, sizes[(precision, rescore)], queries, truth)
            # build time of what this setting stores: its codes, and the float16 copy when it re-scores
            r["build_s"] = round(build_s[precision] + (build_s["float16"] if rescore else 0), 2)
            print(f"  {precision}{' + rescore' if rescore else ''}: single p50 {r['single']['p50_ms']:.0f} ms, "
                  f"batch64 p50 {r['batch64']['p50_ms']:.0f} ms, R@10 {r['recall@10']:.3f}, "
                  f"RSS {gb(r['rss_while_searching_bytes'])}", flush=True)
            rows.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    report = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "offset": args.offset,
              "queries": args.queries, "scan_budget_gb": args.scan_budget_gb, "generate_s": round(t_gen, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
              "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "settings": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
