"""Training embeds with the engine's own code (default mode), and ``official_quirks`` reproduces the released
training step: its prompt, decode round trip, three paddings and layout, and one optimiser step equal to an
independent port of ``ft_llm.py`` (tests/support/official_port.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e5v.tiny import FAMILIES
from e5v.train.data import Triplet

from support.training import write_csv

CPU = torch.device("cpu")
SENTENCES = ["A dog.", "Two children are playing soccer on the grass in the sun today.", "hello",
             "He's here, isn't he?", "The stock market fell today, and nobody expected it."]


def _training_vectors(path: str, sentences=SENTENCES):
    """Training's forward (LoRA with random B, dropout off) of one chunk of anchors, L2-normalised; and the model."""
    from support.train_worker import lora_model, sentences as training_sentences

    lm, model = lora_model(path)
    sents = training_sentences(path)
    anchors, _, _, _ = sents.inputs([Triplet(s, s) for s in sentences])
    with torch.no_grad():
        return F.normalize(sents.encoder(lm, CPU)(anchors), dim=-1).numpy(), model


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_equals_encode_text(tiny_dirs, family, tmp_path):
    """The vectors training computes are the engine's: the adapter saved from the training model, loaded by
    E5V.from_pretrained, embeds the same sentences to the same vectors (fp32)."""
    from e5v import E5V

    path = str(tiny_dirs[family])
    got, model = _training_vectors(path)
    model.peft.save_pretrained(str(tmp_path / "adapter"))
    want = E5V.from_pretrained(path, adapter=str(tmp_path / "adapter")).encode_text(SENTENCES)
    base = E5V.from_pretrained(path).encode_text(SENTENCES)
    assert np.abs(got - want).max() <= 1e-6, family
    assert np.abs(got - base).max() > 1e-3  # the LoRA weights are really in both


def test_wrong_engine_pooling_breaks_training_too(tiny_dirs, monkeypatch, tmp_path):
    """Training pools with the engine's function: a wrong position there changes training's vectors, to exactly the
    engine's (wrong) vectors."""
    import e5v.batching
    from e5v import E5V

    path = str(tiny_dirs["e5v-like"])
    right, _ = _training_vectors(path)
    monkeypatch.setattr(e5v.batching, "pool_last", lambda hidden: hidden[:, -2])
    wrong, model = _training_vectors(path)
    assert np.abs(right - wrong).max() > 1e-2
    model.peft.save_pretrained(str(tmp_path / "adapter"))
    engine = E5V.from_pretrained(path, adapter=str(tmp_path / "adapter")).encode_text(SENTENCES)
    assert np.abs(wrong - engine).max() <= 1e-6


# --- official_quirks --------------------------------------------------------------------------------------------
def _quirks(tiny_dirs, **kw):
    from support.train_worker import sentences

    from e5v.train.official import OfficialQuirks

    return OfficialQuirks(sentences(str(tiny_dirs["e5v-like"])).backbone, **kw)


def test_official_decode_round_trip_is_transformers_4_41_2s(tiny_dirs):
    """Every sentence is tokenised, cut to 32 tokens and decoded with the 4.41.2 clean-up of the Llama-3 tokenizer."""
    q = _quirks(tiny_dirs)

    def inner(sentence):
        return q.text(sentence).split("\n\n", 1)[1].split("\n")[0]

    assert inner("Yes , I do n't know .") == "Yes, I don't know."
    assert inner("Really ? It 's ' ok ' !") == "Really? It's'ok '!"  # in order: " !" goes before " ' " is seen
    assert inner("They 're sure , I 'm sure , we 've seen") == "They're sure, I'm sure, we've seen"
    assert inner("don 't  touch") == "don 't  touch"  # only the ten replacements of 4.41.2
    long = " ".join(["water"] * 80)
    tok = q.tokenizer
    cut = inner(long)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == 32 and long.startswith(cut)


def test_official_three_paddings(tiny_dirs):
    """Anchors and hard negatives: pad token (EOS) up to their field's width (a multiple of 8), attended; positives:
    token 0 up to theirs, masked; all three: pad token up to the common width, attended; token 0 always masked."""
    from e5v.train.official import QuirkSeq

    q = _quirks(tiny_dirs)
    pad = q.tokenizer.eos_token_id
    assert pad > 0
    seqs = [QuirkSeq(0, (7,) * 3), QuirkSeq(0, (7,) * 5), QuirkSeq(1, (8,) * 2), QuirkSeq(1, (8,) * 9),
            QuirkSeq(2, (9,) * 17), QuirkSeq(2, (0, 9))]
    batch = q.collate(seqs)
    ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    assert len(ids[0]) == 24  # the negatives' 17 -> 24; anchors' field 8, positives' 16
    assert ids[0] == [pad] * 21 + [7] * 3 and mask[0] == [1] * 24
    assert ids[2] == [pad] * 8 + [0] * 14 + [8] * 2 and mask[2] == [1] * 8 + [0] * 14 + [1] * 2
    assert ids[3] == [pad] * 8 + [0] * 7 + [8] * 9
    assert ids[5] == [pad] * 22 + [0, 9] and mask[5] == [1] * 22 + [0, 1]  # a real token of id 0 is masked


def test_official_layout_whole_groups_whatever_the_processes(tiny_dirs):
    """Groups of batch_size / official_world_size triplets in sampler order; processes take whole groups; each
    group is one chunk holding its anchors, positives and hard negatives."""
    q = _quirks(tiny_dirs, group_size=3)
    rows = [Triplet(f"anchor {i}", f"positive {i}", f"negative {i}" if i != 4 else None) for i in range(8)]
    assert q.shard(rows, 0, 2) == rows[:6] and q.shard(rows, 1, 2) == rows[6:]
    assert q.shard(rows, 0, 3) == rows[:3] and q.shard(rows, 2, 3) == rows[6:]
    assert q.shard(rows, 3, 4) == []
    a, p, n, plan = q.inputs(rows)
    assert len(a) == len(p) == 8 and len(n) == 7
    seqs = a + p + n
    texts = [[q.tokenizer.decode(seqs[k].ids) for k in chunk] for chunk in plan]
    assert [len(c) for c in plan] == [9, 8, 6]
    assert all(f"anchor {i}" in texts[0][i] for i in range(3)) and "negative 2" in texts[0][-1]
    assert "positive 3" in texts[1][3] and not any("negative 4" in t for t in texts[1])


@pytest.mark.parametrize("clip", [1.0, 30.0])
def test_official_quirks_step_equals_the_released_step(tiny_dirs, tmp_path, clip):
    """One optimiser step of ``e5v train --official-quirks`` (one process, any micro-batch) equals the released step
    on 2 GPUs (independent port), fp32. e5v sums the ranks' gradients, so it clips at 2 x clip with Adam eps
    2 x eps where DeepSpeed averaged them and used clip and eps (eps chosen large enough to matter). Clip 1.0 (the
    released value): clipping active on both sides. Clip 30: the averaged gradient is under it but the sum is
    not, so clipping the sum at the released value (what e5v did before) is a different step."""
    from support import official_port
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from e5v.train import make_config, train
    from e5v.train.data import batch_indices

    path = str(tiny_dirs["e5v-like"])
    rows = [("A man is playing a guitar .", "Someone plays an instrument .", "A woman isn't slicing an onion !"),
            ("He's here , isn't he ?", "They 're here .", "We 've gone"),
            ("a dog", "a dog runs across the park with a red ball and a " + "very " * 30 + "long tail", "a cat"),
            ("Two children are playing soccer on the grass in the sun .", "kids play", "I 'm alone"),
            ("the stock market fell today", "stocks dropped", "stocks rose ' a lot '"),
            ("photo of a small house by the sea", "a house", "a car")]
    data = write_csv(tmp_path / "d.csv", rows)
    eps, lr, seed = 1e-3, 1e-3, 42
    ordered = [rows[i] for i in batch_indices(len(rows), len(rows), 0, seed)]  # e5v's sampler order
    port = official_port.load_model(path, r=8, alpha=16, dropout=0.0, seed=seed)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(port).items()}
    loss, norm, _ = official_port.official_step(port, AutoTokenizer.from_pretrained(path), [ordered[:3], ordered[3:]],
                                                lr=lr, clip=clip, eps=eps)
    want = get_peft_model_state_dict(port)
    # measured: loss 4.9662, averaged gradient norm 19.82 (the sum's: 39.64)
    assert norm > 3 * clip if clip == 1.0 else norm < clip < 2 * norm
    assert max(float((want[k] - before[k]).abs().max()) for k in want) > 1e-4  # the step moved the adapter

    def e5v_step(name, **kw):
        cfg = dict(model=path, data=str(data), output_dir=str(tmp_path / name), official_quirks=True,
                   official_world_size=2, batch_size=6, max_steps=1, warmup_steps=0, learning_rate=lr, lora_r=8,
                   lora_alpha=16, lora_dropout=0.0, gradient_checkpointing=False, progress=False, tensorboard=False,
                   seed=seed, max_grad_norm=2 * clip, adam_epsilon=2 * eps)
        train(make_config(**{**cfg, **kw}))
        record = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])
        got = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        assert got.keys() == want.keys()
        return record, max(float((got[k] - want[k]).abs().max()) for k in want)

    for micro in (4, 100) if clip == 1.0 else (100,):  # the chunks are the official groups whatever the micro-batch
        record, diff = e5v_step(f"micro-{micro}", micro_batch_size=micro)
        assert abs(record["loss"] - loss) < 1e-5 and abs(record["grad_norm"] - 2 * norm) < 1e-4 * norm
        assert diff < 1e-6, micro  # measured: 6.8e-9
    # the released values on the summed gradient: eps alone (clip 1.0), or the clip (clip 30), gives another step
    wrong = dict(adam_epsilon=eps) if clip == 1.0 else dict(max_grad_norm=clip)
    _, diff = e5v_step("unscaled", micro_batch_size=100, **wrong)
    assert diff > 1e-5
