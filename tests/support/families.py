"""What every backbone family must show against its official formula (issue 15), as functions that a family's test
module calls with its own reference.

A reference is ``embed(inner, text=None, image=None) -> unit vector``: the official formula for one item, written
without e5v: the prompt in the model's chat format, the HF processor (or its image processor), the full model
called on that one item with ``output_hidden_states=True``, ``hidden_states[-1][:, -1]``, L2-normalised, fp32.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from e5v import E5V

from . import TEXTS

#: the E5-V prompts, spelled out here (not taken from e5v.prompts): text, image, composed (CIRR)
TEXT_INNER = "<sent>\nSummary above sentence in one word: "
IMAGE_INNER = "<image>\nSummary above image in one word: "
CIRR_INNER = '<image>Modify this image with "<sent>", desribe modified image in one word:'
EDITS = ["is red", "has two dogs instead of one cat", "zoomed out"]


def messages(inner: str, text: str | None = None, image=None) -> list[dict]:
    """One user message for ``apply_chat_template``: the prompt, the text put in, around the image as content parts
    (the image itself in its part where given, as a processor's own template call takes it)."""
    filled = inner.replace("<sent>", text) if text is not None else inner
    before, marker, after = filled.partition("<image>")
    parts = [{"type": "text", "text": before}] if before else []
    if marker:
        parts.append({"type": "image", "image": image} if image is not None else {"type": "image"})
    if after:
        parts.append({"type": "text", "text": after})
    return [{"role": "user", "content": parts}]


@torch.no_grad()
def official_vector(model, inputs: dict) -> np.ndarray:
    """The official formula on one item's model inputs: the full model, ``hidden_states[-1][:, -1]``, L2-normalised."""
    out = model(**inputs, output_hidden_states=True, return_dict=True)
    return F.normalize(out.hidden_states[-1][:, -1], dim=-1)[0].numpy()


def reference_vectors(ref, images) -> dict[str, np.ndarray]:
    """The reference's vectors of the test's texts, images and composed pairs, one item at a time."""
    return {"text": np.stack([ref(TEXT_INNER, t) for t in TEXTS]),
            "image": np.stack([ref(IMAGE_INNER, None, im) for im in images]),
            "composed": np.stack([ref(CIRR_INNER, t, im) for im, t in zip(images, EDITS)])}


def engine_vectors(engine: E5V, images) -> dict[str, np.ndarray]:
    """The engine's vectors of the same items, each kind in one call (mixed sizes batched together)."""
    return {"text": engine.encode_text(TEXTS), "image": engine.encode_image(images),
            "composed": engine.encode_composed(list(zip(images, EDITS)), task="cirr")}


def assert_parity(engine: E5V, want: dict[str, np.ndarray], images, atol: float = 1e-5) -> None:
    """Padded, and packed where the family packs: every vector within ``atol`` of the reference's."""
    engines = [engine] + ([E5V(engine.backbone, packing=True)] if engine.backbone.supports_packing else [])
    for m in engines:
        got = engine_vectors(m, images)
        for kind in want:
            np.testing.assert_allclose(got[kind], want[kind], atol=atol, err_msg=f"{kind}, packing={m.packing}")
    # the vectors are not all alike: the equality above could not hold by accident
    for kind in want:
        assert np.abs(want[kind][0] - want[kind][1]).max() > 1e-3, kind


def assert_sensitive(engine: E5V, want: dict[str, np.ndarray], images, monkeypatch) -> None:
    """Parity breaks with the wrong pooling position, and with right padding (except for the unpadded longest)."""
    import e5v.batching

    with monkeypatch.context() as m:
        m.setattr(e5v.batching, "pool_last", lambda h: h[:, -2])
        assert np.abs(engine.encode_text(TEXTS) - want["text"]).max() > 1e-2
        assert np.abs(engine.encode_image(images) - want["image"]).max() > 1e-2
    with monkeypatch.context() as m:
        m.setattr(engine.backbone, "padding_side", "right")
        got = E5V(engine.backbone, packing=False).encode_text(TEXTS)
    assert np.abs(got - want["text"]).max() > 1e-2


def check_family(engine: E5V, ref, images, monkeypatch) -> None:
    """Parity (padded and packed) and sensitivity of one family."""
    want = reference_vectors(ref, images)
    assert_parity(engine, want, images)
    assert_sensitive(engine, want, images, monkeypatch)
