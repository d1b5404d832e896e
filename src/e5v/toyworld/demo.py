"""``e5v demo``: the whole system on the bundled mini model, offline, in well under a minute on 2 CPU cores.

It renders a gallery of held-out toy scenes (combinations the model never saw), indexes it (``e5v.store.build_index``),
runs text, image and composed (image + modification) queries through the index, prints the top results and the
recall figures with and without the E5-V prompts, and writes an HTML page with the thumbnails. With the bundled
model it also shows the paper's claim 2 on this gallery and a second one: recall before and after the text-only
stage C, and after stage C on shuffled pairs (the control).
"""
from __future__ import annotations

import html
import json
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

from . import MINI, MINI_BEFORE_C, MINI_SHUFFLED, world

#: the models of the claim-2 table: (name, checkpoint, adapter); None stands for the demo's own model
CLAIM2_MODELS = (("before stage C", MINI_BEFORE_C, None), ("after stage C (shipped)", None, None),
                 ("shuffled-pairs control", MINI_BEFORE_C, MINI_SHUFFLED))


def pick_queries(g, rng: random.Random) -> list[dict]:
    """Two plain and two rich text queries, two image queries (the same scenes re-drawn with other jitter) and two
    composed queries, each with the gallery scene it should find."""
    n = len(g.scenes)
    qs = [{"kind": "text", "text": g.plain[i], "want": i} for i in rng.sample(range(n), 2)]
    qs += [{"kind": "text", "text": g.rich[i], "want": i} for i in rng.sample(range(n), 2)]
    qs += [{"kind": "image", "scene": world.Scene(g.scenes[i].objects, seed=i + 10 ** 6), "want": i}
           for i in rng.sample(range(n), 2)]
    pairs = rng.sample(g.composed, min(2, len(g.composed)))  # a small gallery may hold no edit pairs
    qs += [{"kind": "composed", "ref": r, "text": words, "want": t} for r, words, t in pairs]
    return qs


def run_demo(out, *, model: str = str(MINI), scenes: int = 200, top: int = 5, second_gallery: int = 7,
             open_page: bool = False) -> int:
    """The demo into folder ``out`` (see the module's docstring); ``second_gallery``: the seed of the claim-2
    table's second gallery. Returns 0."""
    from ..encoder import load_engine
    from .measure import evaluate

    t0 = time.perf_counter()
    out = Path(out)
    config = engine_config(model)
    g, index = index_gallery(out, scenes, config)
    with load_engine(config, progress=False) as engine:
        cards = run_queries(engine, g, index, out, top)
        figures = {"with prompts": evaluate(engine, g), "without prompts": evaluate(engine, g, prompted=False)}
        print_figures(figures, len(g.scenes))
        claim = claim2(engine, figures["with prompts"], g, second_gallery) \
            if Path(model).resolve() == MINI.resolve() else {}
    if claim:
        print_claim2(claim)
        figures["claim 2"] = claim
    (out / "recall.json").write_text(json.dumps(figures, indent=2) + "\n")
    page = out / "index.html"
    page.write_text(render_page(cards, figures, out, len(g.scenes), model))
    print(f"\npage: {page.resolve()}  ({time.perf_counter() - t0:.1f} s)")
    if open_page:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())
    return 0


def engine_config(model, adapter=None):
    """The demo's engines: on the CPU in fp32 (the gallery's index and the queries alike)."""
    from ..config import EngineConfig

    return EngineConfig(model=str(model), adapter=str(adapter) if adapter else None, device="cpu", dtype="float32")


def index_gallery(out: Path, scenes: int, config):
    """(gallery, index): ``scenes`` held-out scenes drawn into ``out/gallery`` and indexed into ``out/index`` by
    the engine of ``config``."""
    from ..errors import E5VError
    from ..store import build_index, open_index
    from .measure import gallery

    pics = out / "gallery"
    pics.mkdir(parents=True, exist_ok=True)
    (out / "queries").mkdir(exist_ok=True)
    g = gallery(scenes)
    names = gallery_names(g)
    for stale in set(p.name for p in pics.glob("[0-9][0-9][0-9]-*.png")) - set(names):
        (pics / stale).unlink()  # a larger gallery of an earlier run in the same folder
    for name, image in zip(names, g.images):
        if not (pics / name).exists():
            image.save(pics / name)
    print(f"gallery: {len(g.scenes)} held-out scenes in {pics}")
    if (out / "index").is_dir() and _holds_other_gallery(out / "index", names):
        shutil.rmtree(out / "index")  # the demo's own index of an earlier gallery: rebuilt for this one
    summary = build_index(pics, out / "index", config=config, progress=False)
    if summary.skipped:
        raise E5VError(f"{len(summary.skipped)} gallery pictures could not be indexed, e.g. "
                       f"{summary.skipped[0]['item']}: {summary.skipped[0]['reason']}")
    index = open_index(out / "index")
    print(f"index: {index.count} pictures in {index.path}")
    return g, index


def _holds_other_gallery(folder: Path, names: list[str]) -> bool:
    """Whether the index in ``folder`` was built from other pictures than ``names`` (an unreadable one is left to
    the build, which says what is wrong with it)."""
    from ..errors import E5VError
    from ..store import open_index

    try:
        held = {Path(i).name for i in open_index(folder).ids()}
    except E5VError:
        return False
    return held != set(names)


def gallery_names(g) -> list[str]:
    """The file names of the gallery's pictures, in scene order."""
    return [f"{i:03d}-{s.id}.png" for i, s in enumerate(g.scenes)]


def run_queries(engine, g, index, out: Path, top: int) -> list[tuple]:
    """Run and print the queries of :func:`pick_queries` through the index; one card per query for the page:
    (query, label, query image, shown hits, wanted id, rank or None)."""
    from ..store import embed_query

    pics, names = out / "gallery", gallery_names(g)
    row_of = {Path(index.path_of(i)).name: i for i in index.ids()}
    cards = []
    for n, q in enumerate(pick_queries(g, random.Random(0))):
        image = None
        if q["kind"] == "image":
            image = out / "queries" / f"q{n}.png"
            world.render(q["scene"]).save(image)
        elif q["kind"] == "composed":
            image = pics / names[q["ref"]]
        vec = embed_query(engine, index.info, text=q.get("text"), image=str(image) if image else None)
        hits = [h for h in index.search(vec[None], top + 1)[0] if not (image and h.id == row_of.get(image.name))]
        want = row_of[names[q["want"]]]
        shown = hits[:top]
        rank = next((k + 1 for k, h in enumerate(hits) if h.id == want), None)
        label = (f'"{q["text"]}"' if q["kind"] == "text" else f"image {q['scene'].id} (re-drawn)"
                 if q["kind"] == "image" else f'image {g.scenes[q["ref"]].id} + "{q["text"]}"')
        print(f"\n{q['kind']} query: {label}  -> wanted {g.scenes[q['want']].id}, "
              f"{'found at rank ' + str(rank) if rank else 'not in the top ' + str(top)}")
        for k, h in enumerate(shown, 1):
            print(f"  {k}. {h.score:.3f}  {Path(h.meta['image']).stem[4:]}{'  <- wanted' if h.id == want else ''}")
        cards.append((q, label, image, shown, want, rank))
    return cards


def print_figures(figures: dict, scenes: int) -> None:
    print(f"\nheld-out recall over {scenes} scenes (chance R@1 {100 / scenes:.1f} %):")
    for name, f in figures.items():
        line = (f"  {name:16s} text->image R@1 {f['t2i_r1_plain']:5.1f} (rich words {f['t2i_r1_rich']:5.1f})  "
                f"image->text R@1 {f['i2t_r1_plain']:5.1f}  modality gap {f['gap_plain']:.2f}")
        if "composed_r1" in f:
            line += (f"  composed R@1 {f['composed_r1']:.1f} R@5 {f['composed_r5']:.1f} "
                     f"({f['composed_queries']} queries)")
        print(line)


def print_claim2(claim: dict) -> None:
    print("\nclaim 2 (text-only training helps across modalities): R@1 with the E5-V prompts before and after "
          "the text-only stage C, and after stage C on shuffled pairs (the control):")
    for name, rows in claim.items():
        for k, (model_name, f) in enumerate(rows.items()):
            composed = f"{f['composed_r1']:5.1f}" if "composed_r1" in f else "  n/a"  # no edit pairs in the gallery
            print(f"  {name if k == 0 else '':20s} {model_name:24s} text->image {f['t2i_r1_plain']:5.1f} "
                  f"(rich words {f['t2i_r1_rich']:5.1f})  image->text {f['i2t_r1_plain']:5.1f}  composed {composed}")


def claim2(model, shipped: dict, g, second: int) -> dict:
    """{gallery: {model: figures}} for the models of ``CLAIM2_MODELS`` on ``g`` (seed 0) and on gallery ``second``
    of the same size. ``model`` is the demo's own (the shipped one), whose figures on ``g`` are ``shipped``."""
    from ..encoder import load_engine
    from .measure import evaluate, gallery

    galleries = {"gallery 0 (held-out)": g, f"gallery {second}": gallery(len(g.scenes), second)}
    out = {name: {} for name in galleries}
    for model_name, path, adapter in CLAIM2_MODELS:
        with nullcontext(model) if path is None else load_engine(engine_config(path, adapter), progress=False) \
                as engine:
            for name, gal in galleries.items():
                out[name][model_name] = shipped if path is None and gal is g else evaluate(engine, gal)
    return out


def render_page(cards, figures, out: Path, scenes: int, model: str) -> str:
    """A self-contained page; thumbnails are the gallery's own files, linked relatively."""
    def thumb(path, caption, mark=""):
        rel = Path(path).resolve().relative_to(out.resolve()).as_posix()
        return (f'<figure class="{mark}"><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    rows = []
    for q, _, image, hits, want, rank in cards:
        query = thumb(image, "query") if image else ""
        text = f"<p class=q>{html.escape(q['text'])}</p>" if q.get("text") else ""
        found = f"found at rank {rank}" if rank else "not found in the top results"
        results = "".join(thumb(h.meta["image"], f"{h.score:.3f}", "hit" if h.id == want else "") for h in hits)
        rows.append(f"<section><h2>{q['kind']} query · {html.escape(found)}</h2><div class=row>"
                    f"<div class=query>{query}{text}</div><div class=results>{results}</div></div></section>")
    def composed(f):
        return f"{f['composed_r1']:.1f} / {f['composed_r5']:.1f}" if "composed_r1" in f else "—"

    head = "".join(f"<th>{k}</th>" for k in ("", "text→image R@1", "rich words", "image→text R@1", "modality gap",
                                             "composed R@1 / R@5"))
    def figure_row(label, f):
        return (f"<tr><td>{html.escape(label)}</td><td>{f['t2i_r1_plain']:.1f}</td><td>{f['t2i_r1_rich']:.1f}</td>"
                f"<td>{f['i2t_r1_plain']:.1f}</td><td>{f['gap_plain']:.2f}</td><td>{composed(f)}</td></tr>")

    body = "".join(figure_row(n, f) for n, f in figures.items() if n != "claim 2")
    body += "".join(figure_row(f"{g}: {n}", f) for g, models in figures.get("claim 2", {}).items()
                    for n, f in models.items())
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>e5v demo</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}}
table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
section{{background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px 14px;margin:12px 0}}
h2{{font-size:15px;margin:4px 0 8px}}.row{{display:flex;gap:24px;align-items:flex-start}}
.results{{display:flex;gap:10px}}figure{{margin:0;text-align:center;font-size:12px}}
img{{width:96px;height:96px;border:3px solid transparent;border-radius:4px}}.hit img{{border-color:#2a2}}
.q{{max-width:220px;font-style:italic}}</style></head><body>
<h1>e5v demo</h1><p>Model <code>{html.escape(model)}</code>; gallery of {scenes} held-out toy scenes
(colour-shape-position combinations never seen in training); chance R@1 {100 / scenes:.1f} %.
The scene the query should find has a green frame.</p>
<table><tr>{head}</tr>{body}</table>
{''.join(rows)}
</body></html>
"""
