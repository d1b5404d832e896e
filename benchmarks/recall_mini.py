"""What smaller vectors cost on real model output: `e5v index evaluate` on the bundled mini model's toy gallery.

    python benchmarks/recall_mini.py --scenes 2000 --out /tmp/recall-mini      # about 2 min on 2 CPU cores
    python benchmarks/recall_mini.py --scenes 200 --out /tmp/recall-demo       # the demo's gallery size

Renders a gallery of held-out toy scenes, indexes the pictures and their captions, embeds the captions, the
pictures and the composed queries (picture + edit words) with `e5v embed`, and runs `e5v index evaluate` on both
indexes: text->image and composed queries against the picture index, image->text against the caption index.
Writes OUT/recall_images.md and OUT/recall_texts.md (and their JSON rows beside them).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from e5v.cli import main as e5v
from e5v.toyworld import MINI
from e5v.toyworld.demo import gallery_names
from e5v.toyworld.measure import gallery


def run(out: Path, scenes: int, dims: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = gallery(scenes)
    pics = out / "gallery"
    pics.mkdir(exist_ok=True)
    names = gallery_names(g)
    for name, image in zip(names, g.images):
        if not (pics / name).exists():
            image.save(pics / name)
    (out / "captions.txt").write_text("\n".join(g.plain) + "\n")
    (out / "captions.jsonl").write_text("".join(json.dumps({"id": f"cap{i:04d}", "text": t}) + "\n"
                                                for i, t in enumerate(g.plain)))
    (out / "pairs.jsonl").write_text("".join(json.dumps({"id": f"c{k}", "image": str(pics / names[r]), "text": words})
                                             + "\n" for k, (r, words, _) in enumerate(g.composed)))
    model = ["--model", str(MINI), "--no-progress"]
    for args in (["index", "build", str(pics), "--out", str(out / "index")],
                 ["index", "build", str(out / "captions.jsonl"), "--out", str(out / "textindex")],
                 ["embed", "--texts", str(out / "captions.txt"), "--out", str(out / "text.npy")],
                 ["embed", "--pairs", str(out / "pairs.jsonl"), "--task", "cirr", "--out", str(out / "composed.npy")],
                 ["embed", "--images", str(pics), "--out", str(out / "images.npy")]):
        if e5v([*args, *model]) != 0:
            raise SystemExit(f"failed: e5v {' '.join(args)}")
    sizes = ["--dims", *map(str, dims)] if dims else []
    for index, queries, table in (
            ("index", [f"text->image={out / 'text.npy'}", f"composed={out / 'composed.npy'}"], "recall_images.md"),
            ("textindex", [f"image->text={out / 'images.npy'}"], "recall_texts.md")):
        if e5v(["index", "evaluate", str(out / index), "--queries", *queries, *sizes, "--out", str(out / table)]):
            raise SystemExit(f"failed: e5v index evaluate {out / index}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--dims", type=int, nargs="*", default=[16, 32, 64], help="PCA sizes (the mini model: 128-d)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run(args.out, args.scenes, args.dims)
