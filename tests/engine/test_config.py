"""EngineConfig as the one source of the engine's options: the constructor's defaults, the options it passes,
the CLI flags it generates, and the settings that change the vectors (alpha among them)."""
from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

from e5v.config import EngineConfig
from e5v.encoder import E5V
from e5v.errors import ConfigError

ENGINE_FIELDS = ("max_batch_tokens", "max_batch_size", "window", "max_length", "max_pixels", "num_workers",
                 "packing", "group_lengths", "alpha")


def test_engine_defaults_are_the_configs():
    """The E5V constructor takes exactly the fields marked ``engine``, with EngineConfig's defaults (no drift)."""
    params = inspect.signature(E5V.__init__).parameters
    keywords = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert set(keywords) == set(ENGINE_FIELDS) == set(EngineConfig().engine_options())
    assert keywords == {name: defaults[name] for name in ENGINE_FIELDS}
    changed = EngineConfig(max_batch_size=3, window=7, alpha="official", packing=False).engine_options()
    assert (changed["max_batch_size"], changed["window"], changed["alpha"], changed["packing"]) == (
        3, 7, "official", False)


def test_model_flags_and_overrides():
    from e5v import cli

    parse = cli.build_parser().parse_args
    args = parse(["embed", "--model", "m", "--texts", "t.txt", "--out", "o.npy"])
    assert EngineConfig.from_args(args) == EngineConfig(model="m")  # every flag's default is the field's
    assert EngineConfig.from_args(parse(["embed", "--model", "m", "--texts", "t.txt", "--out", "o.npy",
                                         "--packing", "off"])).packing is False
    assert EngineConfig.from_args(args, alpha="official").alpha == "official"
    with pytest.raises(ConfigError, match="unknown engine option.*colour"):
        EngineConfig.from_args(args, colour="red")
    with pytest.raises(SystemExit):  # alpha changes the vectors but is no CLI flag (the protocols set it)
        parse(["embed", "--model", "m", "--texts", "t.txt", "--out", "o.npy", "--alpha", "official"])


def test_quiet_loading_hides_the_weight_bar_only_while_loading(monkeypatch):
    """One quiet load for the Python API and the CLI: ``--no-progress`` hides the bar during the load only."""
    from transformers.utils import logging as hf_logging

    import e5v.encoder
    from e5v import cli
    from e5v.cli.common import load_model

    shown = []
    monkeypatch.setattr(e5v.encoder.E5V, "from_pretrained",
                        classmethod(lambda cls, config=None: shown.append(hf_logging.is_progress_bar_enabled())))
    hf_logging.enable_progress_bar()
    e5v.encoder.load_engine(EngineConfig(model="m"), progress=False)
    e5v.encoder.load_engine(EngineConfig(model="m"))
    argv = ["embed", "--model", "m", "--texts", "t.txt", "--out", "o.npy"]
    load_model(cli.build_parser().parse_args([*argv, "--no-progress"]))
    load_model(cli.build_parser().parse_args(argv))
    assert shown == [False, True, False, True] and hf_logging.is_progress_bar_enabled()


def test_alpha_is_a_vector_setting():
    assert EngineConfig().vector_settings()["alpha"] == "white"
    assert EngineConfig(alpha="official").vector_settings()["alpha"] == "official"


def test_an_index_keeps_its_alpha(model_dir, tmp_path):
    """An index built with ``alpha="official"`` is extended with it when the caller leaves alpha at its default."""
    from PIL import Image

    from e5v.store import add_to_index, build_index, open_index

    images = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):  # fully transparent, a colour underneath
        images.append(tmp_path / f"hidden{i}.png")
        Image.new("RGBA", (48, 32), (*colour, 0)).save(images[-1])
    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text(json.dumps({"id": "a", "image": str(images[0])}) + "\n")
    more.write_text("".join(json.dumps({"id": i, "image": str(p)}) + "\n" for i, p in zip("ab", images)))
    out = tmp_path / "official.idx"
    build_index(first, out, config=EngineConfig(model=model_dir, device="cpu", alpha="official"), progress=False)
    assert json.loads((out / "manifest.json").read_text())["alpha"] == "official"

    summary = add_to_index(out, more, config=EngineConfig(device="cpu"), progress=False)
    assert summary.embedded == 1 and open_index(out).count == 2
    with E5V.from_pretrained(model_dir, device="cpu", alpha="official") as official, \
            E5V.from_pretrained(model_dir, device="cpu") as white:
        want, other = official.encode_image([str(p) for p in images]), white.encode_image([str(images[1])])
    assert not np.allclose(want[1], other[0], atol=1e-3)  # the colour under the transparency shows
    np.testing.assert_allclose(open_index(out).gather(np.arange(2)), want, atol=1e-6)
