"""Captions rendered as images, for the I2I tasks (paper App. A, ``create_text_image`` of the official code).

White 800x400 RGB canvas, black text, font size 40; greedy word wrap so that each line measures at most 760 px
(the width less 40); x = 20; the block centred vertically ((400 - total height) // 2, where the total is the
sum of the lines' bounding-box heights) and each line advanced by its own bounding-box height; words joined
with a trailing space; no horizontal centring and no truncation (very long captions run off the bottom).

The official font is Arial (``arial.ttf`` shipped with the official code).  We use Liberation Sans Regular,
which is metric-compatible with Arial (same advance widths, so the same line breaks) and is free: Debian and
Ubuntu ship it in ``fonts-liberation``, which the project's set-up installs.  ``font_path`` takes Arial itself
if you have it.

One deliberate difference: a single word wider than 760 px makes the official loop run forever; here it is
put on a line of its own (and overflows the right edge), as a longer line would.
"""
from __future__ import annotations

import functools
import os

from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError

WIDTH, HEIGHT = 800, 400
FONT_SIZE = 40
MARGIN_X = 20
MAX_TEXT_WIDTH = WIDTH - 40
#: Liberation Sans (metric-compatible with Arial) as installed by Debian/Ubuntu's fonts-liberation.
DEFAULT_FONT = "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"


@functools.lru_cache(maxsize=4)
def load_font(path: str | None = None, size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    path = os.fspath(path or DEFAULT_FONT)
    if not os.path.isfile(path):
        hint = ("install Liberation Sans (Debian/Ubuntu: apt-get install fonts-liberation; it is metric-compatible "
                "with Arial, the official font) " if path == DEFAULT_FONT else "")
        raise ConfigError(f"font file {path} not found; {hint}or pass --font /path/to/arial.ttf")
    try:
        return ImageFont.truetype(path, size)
    except OSError as exc:
        raise ConfigError(f"cannot load font {path}: {exc}") from exc


def wrap(text: str, font: ImageFont.FreeTypeFont, max_width: int = MAX_TEXT_WIDTH) -> list[str]:
    """Greedy wrap as the official code does: a word joins the line while ``line + word`` fits; every word is
    followed by a space (so lines end with one)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    words = text.split()
    lines = []
    while words:
        line = ""
        while words and draw.textlength(line + words[0], font=font) <= max_width:
            line += words.pop(0) + " "
        if not line:  # one word wider than the line: alone on its line (the official loop never ends here)
            line = words.pop(0) + " "
        lines.append(line)
    return lines


def line_height(draw: ImageDraw.ImageDraw, line: str, font) -> int:
    top, bottom = draw.textbbox((0, 0), line, font=font)[1::2]
    return bottom - top


def render_caption(text: str, font_path: str | None = None) -> Image.Image:
    """The caption drawn on an 800x400 white canvas, as the I2I tasks embed it."""
    font = load_font(font_path)
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    lines = wrap(text, font)
    heights = [line_height(draw, ln, font) for ln in lines]
    y = (HEIGHT - sum(heights)) // 2
    for ln, h in zip(lines, heights):
        draw.text((MARGIN_X, y), ln, font=font, fill=(0, 0, 0))
        y += h
    return image
