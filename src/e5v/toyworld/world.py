"""The toy world: scenes of one or two coloured shapes, rendered as small images and described in words.

Everything is a pure function of a seed, so the recipe, the tests and the demo see the same world.

- An object is a (colour, shape, position) triple: 8 colours x 5 shapes x 5 positions = 200 triples.
- :func:`split` holds out a fixed fifth of the triples. Training scenes use only the other four fifths, and so
  do the edits the recipe trains on (:func:`changed`); held-out scenes contain at least one held-out triple, so
  every one of them is a combination never seen.
- The language has a *plain* register (canonical words, a few sentence forms) and a *rich* one (synonyms and
  other word orders, "a scarlet disc is on the west side"). The recipe's instructions (stages A and B) use the
  plain register only; stage A reads rich captions as plain text, but nothing tells the language model that the
  rich words mean the same things. Text-only contrastive training (stage C) is where that is learnt, as NLI
  teaches a real LLM which sentences mean the same.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

#: colour -> (RGB, rich-register synonym)
COLOURS = {"red": ((220, 40, 40), "scarlet"), "green": ((40, 170, 60), "emerald"),
           "blue": ((50, 90, 230), "azure"), "yellow": ((240, 220, 40), "golden"),
           "purple": ((150, 60, 200), "violet"), "orange": ((245, 140, 20), "amber"),
           "white": ((245, 245, 245), "snowy"), "cyan": ((40, 220, 230), "teal")}
#: shape -> rich-register synonym
SHAPES = {"circle": "disc", "square": "box", "triangle": "wedge", "diamond": "rhombus", "cross": "plus"}
#: position -> (centre x, centre y as fractions of the side, plain phrase, rich phrase)
POSITIONS = {"left": (0.22, 0.5, "on the left", "on the west side"),
             "right": (0.78, 0.5, "on the right", "on the east side"),
             "top": (0.5, 0.22, "at the top", "up north"),
             "bottom": (0.5, 0.78, "at the bottom", "down south"),
             "center": (0.5, 0.5, "in the center", "in the middle")}
BACKGROUND = (40, 40, 46)
SIZE = 64                     # pixels per side of the images the model sees
#: the version of :func:`render`'s pictures: raise it when they change, so that experiments refuse runs trained
#: or measured on the old ones (:mod:`.experiment`)
RENDER = 1


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    position: str

    @property
    def words(self) -> tuple[str, str, str]:
        """The canonical words that name this object: the answers a one-word summary may give."""
        return self.colour, self.shape, self.position


@dataclass(frozen=True)
class Scene:
    """One or two objects at distinct positions, and a seed for the small jitter of their size and place."""

    objects: tuple[Obj, ...]
    seed: int = 0

    @property
    def id(self) -> str:
        return "+".join(f"{o.colour}-{o.shape}-{o.position}" for o in self.objects)

    @property
    def content(self) -> frozenset:
        """What the scene shows, regardless of object order and jitter: two scenes match when these are equal."""
        return frozenset(self.objects)

    @property
    def words(self) -> list[str]:
        return [w for o in self.objects for w in o.words]


TRIPLES = tuple(Obj(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS)


@lru_cache(maxsize=None)
def split(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[frozenset, frozenset]:
    """(training triples, held-out triples). Every colour, shape and position still occurs in training."""
    rng = random.Random(seed)
    while True:
        triples = list(TRIPLES)
        rng.shuffle(triples)
        cut = int(len(triples) * held_out_fraction)
        held, train = frozenset(triples[:cut]), frozenset(triples[cut:])
        if all({getattr(o, a) for o in train} == set(d) for a, d in
               (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS))):
            return train, held


@lru_cache(maxsize=None)
def ordered() -> tuple[list[Obj], list[Obj]]:
    """:func:`split`'s two parts as lists in a fixed order (what seeded choices draw from)."""
    return tuple(sorted(part, key=lambda o: (o.colour, o.shape, o.position)) for part in split())


def _pair(rng: random.Random, first: list[Obj], second: list[Obj]) -> tuple[Obj, Obj]:
    while True:
        a, b = rng.choice(first), rng.choice(second)
        if a.position != b.position:
            return a, b


def scenes(part: str, n: int, *, seed: int = 0, two_fraction: float = 0.6,
           single_fraction: float = 0.1) -> list[Scene]:
    """``n`` distinct scenes of ``part`` ("train" or "held-out"), the same list for the same arguments.

    Held-out scenes are single held-out objects (``single_fraction`` of them, a subset drawn by the seed: there
    are only 40) and pairs with at least one held-out object, in random order, so that galleries of different
    seeds share few scenes. Training scenes are :func:`sample`'s; they may repeat contents with other jitter, as a
    dataset would.
    """
    rng = random.Random(f"{part}:{seed}")
    if part == "held-out":
        train, held = ordered()
        singles = [Scene((o,), rng.randrange(1 << 30)) for o in rng.sample(held, min(len(held),
                                                                                   round(n * single_fraction)))]
        out, seen = singles[:n], {s.content for s in singles[:n]}
        everything = train + held
        while len(out) < n:
            pair = _pair(rng, held, everything)
            scene = Scene(pair if rng.random() < 0.5 else pair[::-1], rng.randrange(1 << 30))
            if scene.content not in seen:
                seen.add(scene.content)
                out.append(scene)
        rng.shuffle(out)
        return out
    if part != "train":
        raise ValueError(f"part must be 'train' or 'held-out', not {part!r}")
    return [sample(rng, two_fraction) for _ in range(n)]


def sample(rng: random.Random, two_fraction: float = 0.6) -> Scene:
    """A random training scene: one or (with ``two_fraction``) two objects of training triples, random jitter."""
    train = ordered()[0]
    objs = _pair(rng, train, train) if rng.random() < two_fraction else (rng.choice(train),)
    return Scene(objs, rng.randrange(1 << 30))


# --- pictures -------------------------------------------------------------------------------------------------
def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image of ``size`` pixels (drawn 4x larger, then reduced: smooth edges)."""
    big = size * 4
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    rng = random.Random(scene.seed)
    for o in scene.objects:
        fx, fy, _, _ = POSITIONS[o.position]
        cx = (fx + rng.uniform(-0.03, 0.03)) * big
        cy = (fy + rng.uniform(-0.03, 0.03)) * big
        r = rng.uniform(0.11, 0.14) * big
        fill = COLOURS[o.colour][0]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            q = r * 0.85
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
        else:  # cross
            t = r * 0.35
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


# --- words ------------------------------------------------------------------------------------------------------
PLAIN_FORMS = ("a {c} {s} {p}", "there is a {c} {s} {p}", "{p}, a {c} {s}")
RICH_FORMS = ("a {s} colored {c} {p}", "{p} we see a {c} {s}", "the picture has a {c} {s} {p}",
              "a {c} {s} is {p}", "one can see a {s} in {c} {p}")
JOINS = ("{} and {}", "{}; {}", "{}, with {}")


def phrase(o: Obj, form: str, rich: bool, rng: random.Random) -> str:
    """One object in words: ``form`` with colour, shape and position filled in (synonyms at random if rich)."""
    c, s, p = o.colour, o.shape, POSITIONS[o.position][2]
    if rich:
        c = COLOURS[o.colour][1] if rng.random() < 0.5 else c
        s = SHAPES[o.shape] if rng.random() < 0.5 else s
        p = POSITIONS[o.position][3] if rng.random() < 0.5 else p
    return _articles(form.format(c=c, s=s, p=p))


def _articles(text: str) -> str:
    """"a" before a consonant sound, "an" before a vowel: "an azure disc", "an orange box"."""
    words = text.split(" ")
    for i, w in enumerate(words[:-1]):
        if w in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def caption(scene: Scene, rng: random.Random, *, rich: bool = False, form: int | None = None) -> str:
    """A description of the scene in the plain or the rich register; objects in random order when there are two.

    ``form`` picks the sentence form (index into the register's forms) instead of a random one."""
    forms = RICH_FORMS if rich else PLAIN_FORMS
    fmt = forms[form % len(forms)] if form is not None else rng.choice(forms)
    objs = list(scene.objects)
    rng.shuffle(objs)
    parts = [phrase(o, fmt, rich, rng) for o in objs]
    if len(parts) == 1:
        return parts[0]
    return rng.choice(JOINS).format(parts[0], parts[1].removeprefix("there is ").removeprefix("the picture has "))


def question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A question about one object that names two of its attributes, and its one-word answer (the third)."""
    o = rng.choice(scene.objects)
    where = POSITIONS[o.position][2]
    twin = any(x is not o and (x.colour, x.shape) == (o.colour, o.shape) for x in scene.objects)
    kind = rng.choice(("colour", "shape") if twin else ("colour", "shape", "position"))
    if kind == "colour":
        return f"What colour is the {o.shape} {where}?", o.colour
    if kind == "shape":
        return f"What shape is {where}?", o.shape
    return f"Where is the {o.colour} {o.shape}?", o.position


def edit_words(old: Obj, new: Obj) -> str:
    """The words that ask to change ``old`` into ``new`` (one attribute differs)."""
    if new.colour != old.colour:
        return f"make the {old.colour} {old.shape} {new.colour}"
    if new.shape != old.shape:
        return _articles(f"turn the {old.colour} {old.shape} into a {new.shape}")
    return f"move the {old.colour} {old.shape} to the {new.position}"


def edits(scene: Scene, within: frozenset | None = None) -> list[tuple[Scene, str]]:
    """Every scene that differs from ``scene`` in one attribute of one object, with the words that ask for it;
    with ``within``, only those whose objects are all in ``within``."""
    out = []
    taken = {x.position for x in scene.objects}
    for i, o in enumerate(scene.objects):
        news = [Obj(c, o.shape, o.position) for c in COLOURS if c != o.colour] + \
               [Obj(o.colour, s, o.position) for s in SHAPES if s != o.shape] + \
               [Obj(o.colour, o.shape, p) for p in POSITIONS if p not in taken]
        for new in news:
            objs = list(scene.objects)
            objs[i] = new
            if len(set(objs)) == len(objs) and (within is None or set(objs) <= within):
                out.append((Scene(tuple(objs), scene.seed), edit_words(o, new)))
    return out


def changed(scene: Scene, rng: random.Random, k: int = 1):
    """A random one of :func:`edits` that keeps to training triples: the scene with one attribute changed, and the
    words that ask for it. The recipe's edit answers and hard negatives come from here, so an edit must not turn
    a training scene into a held-out one. ``k`` > 1: a list of up to ``k`` different ones."""
    allowed = edits(scene, split()[0])
    if not allowed:
        raise ValueError(f"scene {scene.id} has no edit that keeps to training triples")
    return rng.choice(allowed) if k == 1 else rng.sample(allowed, min(k, len(allowed)))
