"""The benchmark's synthetic inputs: JPEG files at COCO-like sizes and captions of COCO-like length."""
from __future__ import annotations

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (375, 500), (612, 612), (640, 360)]
TEXT_TOKENS = (32, 55)  # tokens per text, prompt + caption: those of the GPU anchor measurements
WORDS = ("a man woman child dog cat two small red blue green white black people street table food car tree "
         "sitting standing playing holding next to on in the of with near front large young old field water "
         "building road train plate pizza bus group grass sky beach ball picture kitchen room city").split()


def make_images(n: int, seed: int = 0) -> list[bytes]:
    """JPEG files (in memory) at COCO-like sizes: both paths decode them, as they would read COCO from disk."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in (COCO_SIZES[k % len(COCO_SIZES)] for k in range(n)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_texts(n: int, backbone, seed: int = 0) -> list[str]:
    """Captions whose full prompt takes 32-55 tokens, lengths spread evenly."""
    import numpy as np

    from .. import prompts

    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        target, words = int(rng.integers(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1)), []
        while True:
            words.append(str(rng.choice(WORDS)))
            text = " ".join(words).capitalize() + "."
            if len(backbone.prepare(backbone.render(prompts.fill(prompts.TEXT, text)))) >= target:
                break
        texts.append(text)
    return texts
