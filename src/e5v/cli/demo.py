"""``e5v demo``: the whole system offline on the bundled mini model (:mod:`e5v.toyworld.demo`)."""
from __future__ import annotations

from ..toyworld import MINI

DESCRIPTION = ("The whole system on the bundled mini model, offline: render a gallery of held-out toy scenes, index "
               "it, run text, image and composed queries, report recall with and without the E5-V prompts, and "
               "write an HTML page.")


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="offline demo on the bundled mini model: index a toy gallery, query it, "
                                    "report recall, write an HTML page",
                       description=DESCRIPTION)
    p.add_argument("--model", default=str(MINI), help="checkpoint (default: the bundled mini model)")
    p.add_argument("--out", default="e5v-demo", help="folder for the gallery, the index and index.html")
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes in the gallery")
    p.add_argument("--top", type=int, default=5, help="results shown per query")
    p.add_argument("--second-gallery", type=int, default=7, metavar="SEED",
                   help="seed of the second gallery of the claim-2 table (the first is seed 0)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from ..toyworld.demo import run_demo

    return run_demo(args.out, model=args.model, scenes=args.scenes, top=args.top, second_gallery=args.second_gallery,
                    open_page=args.open)
