"""Speed paths of the engine give the vectors of the default path: worker-process preprocessing, packed
(padding-free) batches, and the AnyRes cap (a deviation, so it must differ and use fewer tokens)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

import e5v.encoder
import e5v.items
from e5v import E5V, prompts
from e5v.errors import ConfigError, E5VError
from e5v.workers import PreparePool

from support import TEXTS

class KillsTheWorker:
    """Unpickling this (in a worker) ends the worker process at once, as an out-of-memory kill would."""

    def __reduce__(self):
        return os._exit, (3,)


def embed_all(m, images, bad_path):
    pairs = list(zip(images[:3], ["is red", "has two dogs", "zoomed out"]))
    return (m.embed(TEXTS[:2] + ["   "] + TEXTS[2:], prompt=prompts.TEXT),
            m.embed(images[:2] + [bad_path] + images[2:], prompt=prompts.IMAGE_PROMPT),
            m.embed(pairs, prompt=prompts.CIRR_QUERY))


def test_workers_give_identical_results_and_skip_bad_items(engine, mixed_images, tmp_path, monkeypatch):
    bad = str(tmp_path / "missing.png")
    want = embed_all(E5V(engine.backbone, window=3), mixed_images, bad)
    events = []  # window k is handed to the workers before the model runs window k-1: preparation overlaps
    submit, run_window = PreparePool.submit, E5V._run_window
    monkeypatch.setattr(PreparePool, "submit",
                        lambda self, w, p: events.append(("prepare", w[0][0])) or submit(self, w, p))
    monkeypatch.setattr(E5V, "_run_window",
                        lambda self, prep, *a: events.append(("run", min(prep.ok_idx + [i for i, _ in prep.skipped])))
                        or run_window(self, prep, *a))
    with E5V(engine.backbone, num_workers=2, window=3) as m:  # small windows: several in flight at once
        got = embed_all(m, mixed_images, bad)
        assert m._pool is not None and not m._pool.closed
    assert m._pool is None  # closed on leaving the block
    two_windows = [("prepare", 0), ("prepare", 3), ("run", 0), ("run", 3)]
    assert events == two_windows + two_windows + [("prepare", 0), ("run", 0)]  # texts, images, pairs
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.vectors, w.vectors)
        np.testing.assert_array_equal(g.indices, w.indices)
        np.testing.assert_array_equal(g.tokens, w.tokens)
        assert [(i, str(e)) for i, e in g.skipped] == [(i, str(e)) for i, e in w.skipped]
    assert [(i, e.item, e.reason) for i, e in got[1].skipped] == [(2, bad, "file not found")]
    assert [i for i, _ in got[0].skipped] == [2]


def test_dead_worker_raises_a_clear_error_and_the_engine_recovers(engine, mixed_images):
    m = E5V(engine.backbone, num_workers=1)
    try:
        with pytest.raises(E5VError, match="worker process died"):
            m.embed([mixed_images[0], KillsTheWorker()], prompt=prompts.IMAGE_PROMPT)
        assert m._pool is None or m._pool.closed
        np.testing.assert_array_equal(m.encode_image(mixed_images[:2]), engine.encode_image(mixed_images[:2]))
    finally:
        m.close()


def test_workers_follow_an_anyres_cap_set_after_they_started(tiny_dirs, mixed_images):
    with E5V.from_pretrained(str(tiny_dirs["llava-next-llama3"]), device="cpu", dtype="float32", num_workers=1) as m:
        full = m.embed(mixed_images, prompt=prompts.IMAGE_PROMPT)
        m.backbone.limit_anyres(1)
        capped = m.embed(mixed_images, prompt=prompts.IMAGE_PROMPT)
    want = E5V(m.backbone).embed(mixed_images, prompt=prompts.IMAGE_PROMPT)  # in this process
    assert capped.tokens.sum() < full.tokens.sum() and capped.tokens.tolist() == want.tokens.tolist()
    np.testing.assert_array_equal(capped.vectors, want.vectors)


def test_workers_restart_when_preprocessing_settings_change(engine):
    m = E5V(engine.backbone, num_workers=1, max_length=40)
    try:
        long = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
        short = m.embed([long], prompt=prompts.TEXT)
        m.max_length = 60
        longer = m.embed([long], prompt=prompts.TEXT)
        assert short.tokens.tolist() == [40] and longer.tokens.tolist() == [60]
    finally:
        m.close()


def test_workers_follow_a_chat_format_changed_after_they_started(tiny_dirs):
    texts = ["A dog sitting in the grass.", "A cat standing in the snow."]
    with E5V.from_pretrained(str(tiny_dirs["llava-next-llama3"]), device="cpu", dtype="float32", num_workers=1) as m:
        chat = m.embed(texts, prompt=prompts.TEXT)
        m.backbone.chat_format = "raw"
        raw = m.embed(texts, prompt=prompts.TEXT)
        want = E5V(m.backbone).embed(texts, prompt=prompts.TEXT)  # in this process
    assert raw.tokens.tolist() == want.tokens.tolist() and (raw.tokens < chat.tokens).all()
    np.testing.assert_array_equal(raw.vectors, want.vectors)


def test_packing_without_restarting_positions_mixes_sequences(engine, monkeypatch):
    """The block-diagonal mask comes from the restarting position ids: without them the sequences attend to
    each other and the vectors change, so the equality test above can fail."""
    bb = engine.backbone
    real = type(bb).collate_packed

    def one_long_sequence(self, items):
        batch, ends = real(self, items)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        return batch, ends

    want = E5V(bb, packing=True).encode_text(TEXTS)
    monkeypatch.setattr(type(bb), "collate_packed", one_long_sequence)
    got = E5V(bb, packing=True).encode_text(TEXTS)
    same = np.abs(got - want).max(axis=1) < 1e-5
    assert same.sum() == 1  # only the first sequence of the row, which has nothing before it
    assert np.abs(got - want).max() > 1e-3


def test_packing_option(engine, monkeypatch):
    bb = engine.backbone
    assert bb.attn_implementation == "sdpa" and E5V(bb).use_packing() is False  # auto: no varlen kernel
    assert E5V(bb, packing=True).use_packing() is True
    monkeypatch.setattr(bb.model.config.text_config, "_attn_implementation", "flash_attention_2")
    assert E5V(bb).use_packing() is True and E5V(bb, packing=False).use_packing() is False
    with pytest.raises(ConfigError, match="packing"):
        E5V(bb, packing="yes")
    with pytest.raises(ConfigError, match="num_workers"):
        E5V(bb, num_workers=-1)


def test_packed_plan_budgets_real_tokens(engine):
    m = E5V(engine.backbone, max_batch_tokens=100)
    lengths = [60, 5, 30, 35, 25, 5]
    batches = m.plan_batches(lengths, packed=True)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in b) <= 100 for b in batches)
    assert len(batches) < len(m.plan_batches(lengths))  # padded sizes fill the budget sooner


def test_length_groups_have_no_padding_and_equal_vectors(engine, mixed_images):
    grouped = E5V(engine.backbone, group_lengths=True)
    lengths = [len(grouped.prepare(e5v.items.Item(image=im), prompts.IMAGE_PROMPT)) for im in mixed_images * 2]
    batches = grouped.plan_batches(lengths)
    assert all(len({lengths[k] for k in b}) == 1 for b in batches) and len(batches) == len(set(lengths))
    np.testing.assert_allclose(grouped.encode_image(mixed_images * 2), engine.encode_image(mixed_images * 2), atol=1e-5)


def test_anyres_cap_uses_fewer_tokens_and_is_a_deviation(tiny_dirs, engine, mixed_images):
    capped = E5V.from_pretrained(str(tiny_dirs["llava-next-llama3"]), device="cpu", dtype="float32",
                                 anyres_max_tiles=1)
    tile = capped.backbone.model.config.vision_config.image_size
    assert capped.backbone.model.config.image_grid_pinpoints == [[tile, tile]]
    assert capped.backbone.image_processor.image_grid_pinpoints == [[tile, tile]]
    full = engine.embed(mixed_images, prompt=prompts.IMAGE_PROMPT)
    cut = capped.embed(mixed_images, prompt=prompts.IMAGE_PROMPT)
    assert (cut.tokens <= full.tokens).all() and cut.tokens.sum() < full.tokens.sum()
    assert np.abs(cut.vectors - full.vectors).max() > 1e-3
    # batched capped vectors equal capped one-by-one: the cap is consistent between processor and model
    np.testing.assert_allclose(cut.vectors, np.concatenate([capped.encode_image([im]) for im in mixed_images]),
                               atol=1e-5)
    with pytest.raises(ConfigError):
        capped.backbone.limit_anyres(0)


def test_anyres_cap_rejected_without_anyres(tiny_dirs):
    with pytest.raises(ConfigError, match="no AnyRes"):
        E5V.from_pretrained(str(tiny_dirs["llava-1.5"]), device="cpu", anyres_max_tiles=1)


def test_cli_workers_flag_reaches_the_engine(monkeypatch):
    from e5v import cli
    from e5v.cli.common import load_model

    seen = {}

    def loaded(cls, name_or_path=None, *, config=None, **options):  # the options the engine would be built with
        seen.update(dataclasses.asdict(config.replace(**options)))

    monkeypatch.setattr(e5v.encoder.E5V, "from_pretrained", classmethod(loaded))
    args = cli.build_parser().parse_args(["embed", "--model", "m", "--texts", "t.txt", "--out", "o.npy",
                                          "--workers", "3", "--packing", "on", "--group-lengths",
                                          "--anyres-max-tiles", "2"])
    load_model(args)
    assert (seen["num_workers"], seen["packing"], seen["group_lengths"], seen["anyres_max_tiles"]) == (3, True, True, 2)
    load_model(cli.build_parser().parse_args(["embed", "--model", "m", "--texts", "t.txt", "--out", "o.npy"]))
    assert (seen["num_workers"], seen["packing"], seen["group_lengths"], seen["anyres_max_tiles"]) == (
        0, "auto", False, None)
