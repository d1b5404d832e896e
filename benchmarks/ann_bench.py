"""Exact vs approximate (faiss HNSW, int8 and fp16 codes) search of an e5v index, on synthetic clustered unit
vectors of E5-V's width, written through the index's own partition writer.

    python benchmarks/ann_bench.py 20000 /tmp/ann-idx          # N vectors, a new folder
"""
import argparse
import time
from pathlib import Path

import numpy as np

from e5v import prompts
from e5v.store import open_index
from e5v.store.ann import build_ann
from e5v.store.build import IndexJob, commit, new_manifest, write_part
from e5v.store.sources import Entry


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="vectors in the index")
    ap.add_argument("folder", type=Path, help="a new folder for the index")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--part-size", type=int, default=5000)
    args = ap.parse_args()
    args.folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, args.dim)).astype(np.float32)
    entries = [Entry(id=f"v{i}", text=f"item {i}") for i in range(args.n)]
    manifest = new_manifest({"model": "synthetic", "prompt": {"image": prompts.IMAGE_PROMPT, "text": prompts.TEXT},
                             "precision": "float16"})
    job = IndexJob("build", "synthetic", "synthetic", 0, args.part_size, entries)
    for j in range(job.nparts):
        k = len(job.part(j))
        vectors = unit(centers[rng.integers(0, 200, k)] + rng.standard_normal((k, args.dim)).astype(np.float32))
        write_part(args.folder, job, j, vectors, [e.row() for e in job.part(j)], [], "float16")
    commit(args.folder, manifest, job)
    queries = unit(centers[rng.integers(0, 200, 100)] + 1.2 * rng.standard_normal((100, args.dim)).astype(np.float32))
    index = open_index(args.folder)
    t = time.perf_counter()
    index.search(queries, 10, exact=True)
    exact_ms = (time.perf_counter() - t) / len(queries) * 1e3
    print(f"n={args.n} dim={args.dim}: exact {exact_ms:.1f} ms/query (batch of {len(queries)}, fp16, memory-mapped)")
    for dtype in ("int8", "float16"):
        t = time.perf_counter()
        info = build_ann(args.folder, dtype=dtype, queries=queries)
        built = time.perf_counter() - t
        index = open_index(args.folder)
        index.search(queries[:5], 10)  # warm
        t = time.perf_counter()
        index.search(queries, 10)
        ann_ms = (time.perf_counter() - t) / len(queries) * 1e3
        size = (args.folder / info["file"]).stat().st_size / 1e6
        print(f"  HNSW {dtype}: build {built:.1f} s, recall@10 {info['recall_at_10']:.3f}, {ann_ms:.2f} ms/query, "
              f"file {size:.0f} MB")


if __name__ == "__main__":
    main()
