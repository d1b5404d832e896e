"""The I2I caption renderer: greedy wrapping at 760 px, x = 20, vertical centring, long captions."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from e5v.errors import ConfigError
from e5v.eval import render

CAPTION = ("Two young guys with shaggy hair look at their hands while hanging out in the yard, next to a red brick "
           "wall and a tall green tree.")


@pytest.fixture(scope="module")
def font():
    return render.load_font()


def _measure(font):
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return lambda s: draw.textlength(s, font=font)


def test_greedy_wrap_fills_each_line(font):
    width = _measure(font)
    lines = render.wrap(CAPTION, font)
    assert len(lines) == 4
    assert "".join(lines).split() == CAPTION.split()
    assert all(ln.endswith(" ") for ln in lines)  # words joined with a trailing space, as the official code
    for ln, nxt in zip(lines, lines[1:]):
        assert width(ln.rstrip(" ")) <= 760
        assert width(ln + nxt.split()[0]) > 760  # greedy: the next word did not fit


def test_block_is_centred_vertically_at_x20(font):
    im = render.render_caption(CAPTION)
    assert im.size == (800, 400) and im.mode == "RGB"
    a = np.asarray(im.convert("L"))
    rows = np.flatnonzero((a < 128).any(axis=1))
    cols = np.flatnonzero((a < 128).any(axis=0))
    draw = ImageDraw.Draw(im)
    lines = render.wrap(CAPTION, font)
    heights = [render.line_height(draw, ln, font) for ln in lines]
    y0 = (400 - sum(heights)) // 2
    top_first = draw.textbbox((0, 0), lines[0], font=font)[1]
    assert abs(rows[0] - (y0 + top_first)) <= 1
    # each line is advanced by its own bbox height: the last line starts at y0 + sum of the others
    y_last = y0 + sum(heights[:-1])
    top_last, bottom_last = draw.textbbox((0, 0), lines[-1], font=font)[1::2]
    assert abs(rows[-1] - (y_last + bottom_last - 1)) <= 1
    assert abs(cols[0] - (20 + draw.textbbox((0, 0), lines[0], font=font)[0])) <= 1
    assert cols[-1] < 20 + 760 + 5
    assert set(np.unique(a[:, :15])) == {255}  # nothing left of the margin


def test_short_caption_sits_in_the_middle():
    a = np.asarray(render.render_caption("A dog.").convert("L"))
    rows = np.flatnonzero((a < 128).any(axis=1))
    centre = (rows[0] + rows[-1]) / 2
    assert 190 <= centre <= 210


def test_long_caption_overflows_without_truncation(font):
    text = " ".join(["lengthy caption words"] * 40)
    lines = render.wrap(text, font)
    assert "".join(lines).split() == text.split() and len(lines) > 10
    a = np.asarray(render.render_caption(text).convert("L"))
    assert (a[0] < 128).any() and (a[-1] < 128).any()  # the block is taller than the canvas: it runs off both ends


def test_word_wider_than_the_line_gets_its_own_line(font):
    lines = render.wrap("short " + "W" * 40 + " end", font)
    assert lines == ["short ", "W" * 40 + " ", "end "]


def test_empty_caption_is_blank():
    assert set(np.unique(np.asarray(render.render_caption("")))) == {255}


def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="font file .*nope.ttf not found"):
        render.load_font(str(tmp_path / "nope.ttf"))
