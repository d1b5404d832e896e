"""Training: data and prompts, the loss, GradCache, 2 processes vs 1, learning, resume after kill -9, merge."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from e5v import prompts
from e5v.errors import ConfigError, InputError
from e5v.train.config import make_config
from e5v.serve.server import free_port
from e5v.train.data import batch_indices, read_triplets, shard
from support.training import WORKER, env, triplet, write_csv

# --- data -------------------------------------------------------------------------------------------------
def test_readers_csv_jsonl_parquet(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("a, with comma", "b", "c"), ("d", "e", ""), ("", "f", "g"), ("h", "i", "j")]
    got = read_triplets(write_csv(tmp_path / "d.csv", rows))
    assert [(t.anchor, t.positive, t.negative) for t in got] == [("a, with comma", "b", "c"), ("d", "e", None),
                                                                  ("h", "i", "j")]
    assert "d.csv:line 4" in caplog.text and "sent0" in caplog.text  # the bad row is named, the others kept
    (tmp_path / "d.jsonl").write_text('{"sent0": "x", "sent1": "y"}\n{"sent0": "p", "sent1": "q", "hard_neg": "r"}\n')
    assert [t.negative for t in read_triplets(tmp_path / "d.jsonl")] == [None, "r"]
    pq.write_table(pa.table({"sent0": ["x"], "sent1": ["y"], "hard_neg": [None]}), tmp_path / "d.parquet")
    assert read_triplets(tmp_path / "d.parquet")[0].positive == "y"
    (tmp_path / "bad.csv").write_text("text,label\nx,1\n")
    with pytest.raises(InputError, match="sent0 and sent1"):
        read_triplets(tmp_path / "bad.csv")
    with pytest.raises(InputError, match=".csv, .jsonl or .parquet"):
        read_triplets(tmp_path / "d.txt")


def test_prompt_real_special_tokens_cutoff_and_official_quirks(tiny_dirs):
    from support.train_worker import sentences

    from e5v.train.official import OfficialQuirks

    sents = sentences(str(tiny_dirs["e5v-like"]))
    tok = sents.backbone.tokenizer
    s = "A man is playing a guitar."
    ids = sents.prepare([s])[0].input_ids.tolist()
    assert ids == tok(prompts.LLAMA3_CHAT.format(prompts.TEXT).replace("<sent>", s))["input_ids"]  # the inference one
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|start_header_id|>") in ids  # a real special token, not text
    long = " ".join(["water"] * 80)
    cut = sents.cut(long)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == 32 and long.startswith(cut)
    q = OfficialQuirks(sents.backbone)
    assert q.text(s) == ("<|start header id|>user<|end header id|>\n\nA man is playing a guitar.\nSummary above "
                         "sentence in one word:<|eot id|><|start header id|>assistant<|end header id|>")
    assert tok.convert_tokens_to_ids("<|start_header_id|>") not in q.tokens(0, [s])[0].ids


def test_batches_deterministic_and_sharded():
    a = [batch_indices(10, 4, s, seed=1) for s in range(6)]
    assert a == [batch_indices(10, 4, s, seed=1) for s in range(6)]
    assert sorted(sum(a[:3], [])) == list(range(10)) and len(a[2]) == 2  # one epoch covers every row once
    assert a[:3] != a[3:]  # reshuffled each epoch
    rows = list(range(7))
    assert shard(rows, 0, 2) + shard(rows, 1, 2) == rows


def test_config_file_flags_and_errors(tmp_path):
    import argparse

    from e5v.cli.train import add_parsers

    (tmp_path / "c.yaml").write_text("model: m\ndata: d.csv\nbatch_size: 32\nlearning_rate: 1e-4\n"
                                     "gradient_checkpointing: false\n")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="verb"))
    from e5v.train.config import config_from_args

    args = parser.parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--batch-size", "64"])
    cfg = config_from_args(args)
    assert (cfg.batch_size, cfg.learning_rate, cfg.gradient_checkpointing, cfg.temperature) == (64, 1e-4, False, 0.05)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.warmup_steps, cfg.cutoff_len) == (64, 16, 0.05, 100, 32)
    with pytest.raises(ConfigError, match="unknown training setting 'batchsize'"):
        make_config({"batchsize": 3})
    with pytest.raises(ConfigError, match="temperature"):
        make_config(model="m", data="d", temperature=0).validate()


def test_resume_refuses_chunk_changes_under_dropout():
    """Chunking settings change only speed and memory, unless LoRA dropout is on: the chunks draw their masks one
    after the other (and compiled kernels their own way), so a resumed run with other chunks would not compute the
    same step. Then they are refused as any other changed setting."""
    from e5v.train.trainer import changed_settings

    saved = make_config(model="m", data="d", lora_dropout=0.0).to_dict()
    for change in ({"micro_batch_size": 8}, {"micro_batch_tokens": 512}, {"sort_by_length": False},
                   {"compile": True}, {"save_steps": 3}):
        assert changed_settings(saved, make_config(**{**saved, **change})) == []
    saved = make_config(model="m", data="d", lora_dropout=0.05).to_dict()
    assert changed_settings(saved, make_config(**{**saved, "micro_batch_size": 8, "micro_batch_tokens": 512,
                                                  "sort_by_length": False, "compile": True, "save_steps": 3})) \
        == ["compile", "micro_batch_size", "micro_batch_tokens", "sort_by_length"]
    assert changed_settings(saved, make_config(**{**saved, "gradient_checkpointing": False})) == []  # masks replayed
    assert changed_settings(saved, make_config(**{**saved, "anyres_max_tiles": 1})) == ["anyres_max_tiles"]


def test_deepspeed_asked_without_package_is_a_clear_error(monkeypatch):
    from e5v.train.trainer import train

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: its import raises ImportError
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        train(make_config(model="m", data="d", deepspeed="configs/deepspeed/zero2.json"))


def test_qlora_without_gpu_or_bitsandbytes_is_a_clear_error(tiny_dirs, tmp_path, monkeypatch, capsys):
    from e5v.cli import main
    from e5v.train.model import wants_4bit

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert wants_4bit("auto", cpu) is False and wants_4bit("auto", gpu) is False  # auto: plain LoRA then
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install bitsandbytes"):
        wants_4bit("true", gpu)
    with pytest.raises(ConfigError, match="load_in_4bit must be true, false or auto"):
        wants_4bit("sometimes", cpu)
    # asked for on this CPU machine, through the CLI: exit 1 with the reason, before the model is loaded
    data = write_csv(tmp_path / "d.csv", [triplet(i) for i in range(4)])
    argv = ["train", "--model", str(tiny_dirs["e5v-like"]), "--data", str(data), "--output-dir",
            str(tmp_path / "out"), "--load-in-4bit", "true", "--no-progress"]
    assert main(argv) == 1
    assert "4-bit QLoRA needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_text_training_loads_the_language_model_only(tiny_dirs):
    from transformers import AutoModelForImageTextToText

    from e5v.train.model import load_language_model

    path = str(tiny_dirs["e5v-like"])
    lm, config, full = load_language_model(path, dtype=torch.float32, device=torch.device("cpu"))
    assert full is None
    assert config.vision_config is not None  # a multimodal checkpoint ...
    assert not any("vision" in n or "projector" in n for n, _ in lm.named_parameters())  # ... its LM alone
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).model.language_model.state_dict()
    got = lm.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)  # the real weights


# --- loss and GradCache -----------------------------------------------------------------------------------
def test_info_nce_matches_formula():
    from e5v.train.loss import info_nce

    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(5, 8, generator=g) for _ in range(3))
    n = n[:3]  # two pairs without a hard negative
    cos = lambda x, y: torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=-1)  # noqa: E731
    logits = torch.cat([cos(a, p), cos(a, n)], 1) / 0.05
    want = -(logits.diagonal() - logits.logsumexp(1)).mean()
    assert torch.allclose(info_nce(a, p, n, 0.05), want, atol=1e-5)
    # bf16 embeddings: the cosines are taken in fp32 (a bf16 cosine / 0.05 would be off by ~1e-2)
    a16, p16, n16 = a.bfloat16(), p.bfloat16(), n.bfloat16()
    logits = torch.cat([cos(a16.float(), p16.float()), cos(a16.float(), n16.float())], 1) / 0.05
    want16 = -(logits.diagonal() - logits.logsumexp(1)).mean()
    got16 = info_nce(a16, p16, n16, 0.05)
    assert got16.dtype == torch.float32 and abs(float(got16 - want16)) < 1e-5


def _lora_grads(tiny_dir, rows, *, chunk, sort, checkpointing=False):
    from support.train_worker import lora_model, sentences

    from e5v.train.data import Triplet
    from e5v.train.gradcache import contrastive_step

    lm, model = lora_model(str(tiny_dir), checkpointing=checkpointing)
    sents = sentences(str(tiny_dir))
    a, p, n, _ = sents.inputs([Triplet(r[0], r[1], r[2] or None) for r in rows])
    res = contrastive_step(sents.encoder(lm, torch.device("cpu")), a, p, n, chunk_size=chunk, sort_by_length=sort)
    return res, {n: p.grad.clone() for n, p in model.named_trainable().items()}


def test_gradcache_equals_plain_large_batch_loss(tiny_dirs):
    rows = [triplet(i) for i in range(6)] + [("a very long anchor sentence about a dog in a park", "dog", "")]
    plain, g0 = _lora_grads(tiny_dirs["e5v-like"], rows, chunk=1000, sort=False)
    assert plain.chunks == 1 and plain.candidates == 7 + 6
    for chunk, sort, ckpt in [(4, False, False), (3, True, False), (5, True, True)]:
        res, g = _lora_grads(tiny_dirs["e5v-like"], rows, chunk=chunk, sort=sort, checkpointing=ckpt)
        assert res.chunks > 1 and abs(res.loss - plain.loss) < 1e-5
        assert max(float((g[k] - g0[k]).abs().max()) for k in g0) < 1e-5
        assert max(float(g0[k].abs().max()) for k in g0) > 1e-3  # the gradients are not trivially zero
    pairs = [(r[0], r[1], "") for r in rows]  # a batch without any hard negative (pairs-only data)
    plain, g0 = _lora_grads(tiny_dirs["e5v-like"], pairs, chunk=1000, sort=False)
    res, g = _lora_grads(tiny_dirs["e5v-like"], pairs, chunk=3, sort=True)
    assert plain.candidates == res.candidates == 7 and res.chunks == 5 and abs(res.loss - plain.loss) < 1e-5
    assert max(float((g[k] - g0[k]).abs().max()) for k in g0) < 1e-5
    sorted_res, _ = _lora_grads(tiny_dirs["e5v-like"], rows, chunk=3, sort=True)
    unsorted_res, _ = _lora_grads(tiny_dirs["e5v-like"], rows, chunk=3, sort=False)
    assert sorted_res.padded_tokens < unsorted_res.padded_tokens  # sorting removes padding


def test_chunks_by_sequences_and_padded_tokens():
    """GradCache chunks hold at most micro_batch_size sequences and micro_batch_tokens padded tokens (count x the
    longest; a longer sequence alone), greedily: longest first (sorted) or in order."""
    from e5v.train.gradcache import plan_chunks

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 400, (200,), generator=g).tolist() + [900]  # one over the budget
    for sort in (True, False):
        plan = plan_chunks(lengths, 24, sort, 1000)
        assert sorted(k for c in plan for k in c) == list(range(201))
        if not sort:
            assert [k for c in plan for k in c] == list(range(201))
        else:
            assert [lengths[c[0]] for c in plan] == sorted((lengths[c[0]] for c in plan), reverse=True)
        for c, after in zip(plan, plan[1:] + [None]):
            assert len(c) <= 24 and (len(c) == 1 or len(c) * max(lengths[k] for k in c) <= 1000)
            if after is not None:  # greedy: the next sequence did not fit
                grown = c + after[:1]
                assert len(grown) > 24 or len(grown) * max(lengths[k] for k in grown) > 1000
    assert plan_chunks([3, 9, 5, 7], 2, True) == [[1, 3], [2, 0]] and plan_chunks([3, 9, 5], 2, False) == [[0, 1], [2]]


def test_the_default_token_budget_keeps_the_official_text_chunks():
    """E5-V's sentences cut to 32 tokens in the text prompt and the Llama-3 chat format (here with the benchmark's
    offline stand-in tokenizer, which tokenises no coarser than the real one) take at most 57 tokens: the default
    micro_batch_tokens leaves the official 72-sequence chunks whole."""
    from e5v.bench.model import build_backbone, build_config
    from e5v.train.embed import EngineSentences
    from e5v.train.gradcache import plan_chunks

    cfg = make_config()
    backbone = build_backbone(build_config(tiny=True), device=torch.device("cpu"), dtype=torch.float32)
    sents = EngineSentences(backbone, cutoff_len=cfg.cutoff_len, max_length=1 << 20)
    words = "Photographers, unsurprisingly, disagreed about the astronomers' extraordinarily idiosyncratic " \
            "measurements of 1,234,567 stars ...".split()
    texts = [" ".join(words[i:] + words[:i]) * 3 for i in range(len(words))]
    lengths = [len(f) for f in sents.prepare(texts)] * 20
    assert max(lengths) == 57
    assert plan_chunks(lengths, cfg.micro_batch_size, True, cfg.micro_batch_tokens) == \
        plan_chunks(lengths, cfg.micro_batch_size, True)
    assert cfg.micro_batch_size * max(lengths) <= cfg.micro_batch_tokens


def test_gradcache_replays_dropout(tiny_dirs):
    """With LoRA dropout on, pass 3 must see pass 1's masks: the embeddings of both passes are identical."""
    from support.train_worker import lora_model, sentences

    from e5v.train.data import Triplet
    from e5v.train.gradcache import contrastive_step

    lm, _ = lora_model(str(tiny_dirs["e5v-like"]), dropout=0.5, b_std=0.5)
    sents = sentences(str(tiny_dirs["e5v-like"]))
    encode = sents.encoder(lm, torch.device("cpu"))
    seen = []
    a, p, n, _ = sents.inputs([Triplet(*triplet(i)) for i in range(4)])
    contrastive_step(lambda seqs: _record(encode, seqs, seen), a, p, n, chunk_size=5)
    half = len(seen) // 2
    assert half == 3 and all(torch.equal(x, y) for x, y in zip(seen[:half], seen[half:]))
    assert not torch.equal(encode(a[:1]), encode(a[:1]))  # dropout is really on


def _record(encode, seqs, seen):
    out = encode(seqs)
    seen.append(out.detach().clone())
    return out


# --- 2 processes == 1 process --------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one(tiny_dirs, tmp_path):
    from support import train_worker

    data = write_csv(tmp_path / "d.csv", [triplet(i) for i in range(5)] + [("lonely anchor", "its pair", "")])
    train_worker.grads(str(tiny_dirs["e5v-like"]), str(data), str(tmp_path / "one.pt"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER, "grads",
           str(tiny_dirs["e5v-like"]), str(data), str(tmp_path / "two.pt")]
    proc = subprocess.run(cmd, env={**env(), "CHUNK": "3"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["candidates"] == two["candidates"] == 6 + 5  # every anchor sees the global batch
    assert abs(one["loss"] - two["loss"]) < 1e-5
    assert max(float((one["grads"][k] - two["grads"][k]).abs().max()) for k in one["grads"]) < 1e-5
    assert max(float(v.abs().max()) for v in one["grads"].values()) > 1e-3


# --- end to end: learning, resume, merge ---------------------------------------------------------------------
def _cfg(tiny_dir, data, out, **kw) -> dict:
    base = dict(model=str(tiny_dir), data=str(data), output_dir=str(out), batch_size=32, micro_batch_size=40,
                warmup_steps=2, learning_rate=2e-3, lora_r=8, gradient_checkpointing=False, progress=False,
                max_steps=15, save_steps=100)
    return {**base, **kw}


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """One run shared by the tests below, end to end through the main CLI: ``e5v train --config FILE --flags``."""
    import contextlib
    import io

    import yaml

    from e5v.cli import main

    root = tmp_path_factory.mktemp("trained")
    data = write_csv(root / "nli.csv", [triplet(i) for i in range(96)])
    cfg = _cfg(tiny_dirs["e5v-like"], data, root / "run")
    flags = ["--max-steps", str(cfg.pop("max_steps")), "--no-gradient-checkpointing", "--no-progress"]
    del cfg["gradient_checkpointing"], cfg["progress"]
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    console = _Lines()
    logging.getLogger("e5v.train").addHandler(console)
    try:
        with contextlib.redirect_stdout(out):
            assert main(["train", "--config", str(root / "train.yaml"), *flags]) == 0
    finally:
        logging.getLogger("e5v.train").removeHandler(console)
    steps = [ln for ln in console.lines if ln.startswith("step ")]
    assert len(steps) == 15 and steps[0].startswith("step 1/15 loss ")  # the console log, one line per step
    assert all(" sentences/s (64 candidates per anchor)" in ln and " lr " in ln and " grad-norm " in ln
               for ln in steps)
    adapter = root / "run" / "adapter"
    assert out.getvalue().startswith(f"trained {tiny_dirs['e5v-like']} on {data}; step 15 loss ")
    assert out.getvalue().rstrip().endswith(f"adapter -> {adapter}")
    return adapter


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _margins(model):
    """Over 36 held-out triplets: mean cos(anchor, paraphrase), mean cos(anchor, hard negative), the share of
    anchors whose paraphrase beats their hard negative, how much closer the paraphrase is than the other
    held-out paraphrases (mean cos gap), and top-1 retrieval of the paraphrase among all 72 candidates."""
    held = [triplet(i) for i in range(200, 236)]  # held-out: numbers never seen in training
    a, p, n = (model.encode_text([h[k] for h in held]) for k in range(3))
    pos, neg = (a * p).sum(1), (a * n).sum(1)
    ap = a @ p.T
    others = (ap.sum(1) - pos) / (len(held) - 1)
    top1 = (np.concatenate([ap, a @ n.T], 1).argmax(1) == np.arange(len(held))).mean()
    return float(pos.mean()), float(neg.mean()), float((pos > neg).mean()), float((pos - others).mean()), float(top1)


def test_tensorboard_holds_the_logged_scalars(trained):
    """With TensorBoard installed (it is in the test set), every logged step is also a TensorBoard scalar."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = [json.loads(x) for x in (trained.parent / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(trained.parent / "tensorboard"))
    events.Reload()
    keys = ("loss", "lr", "grad_norm", "sentences_per_s")
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in keys}
    for key in keys:
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [r["step"] for r in log]
        assert np.allclose([e.value for e in scalars], [r[key] for r in log], rtol=1e-5)


def test_training_lowers_loss_and_separates_held_out_pairs(tiny_dirs, trained):
    from e5v import E5V

    log = [json.loads(x) for x in (trained.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert all(r["candidates"] == 64 and r["sentences_per_s"] > 0 and r["grad_norm"] > 0 for r in log)
    from transformers import get_linear_schedule_with_warmup  # the schedule of the official run (HF Trainer's)

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    sched, want = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=15), []
    for _ in range(15):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert np.allclose([r["lr"] for r in log], want, rtol=1e-6, atol=1e-12) and max(want) == 2e-3
    before = _margins(E5V.from_pretrained(str(tiny_dirs["e5v-like"])))
    after = _margins(E5V.from_pretrained(str(tiny_dirs["e5v-like"]), adapter=str(trained)))
    # measured: before (pos .982, neg .989, wins .08, gap .014, top-1 0); after (.981, .655, 1.0, .403, .83)
    assert before[2] < 0.5 and before[1] > before[0]  # untrained: hard negatives closer than paraphrases
    assert after[2] >= 0.9  # trained: the paraphrase wins for (almost) every held-out anchor
    assert after[0] - after[1] > 0.15 and after[1] < before[1] - 0.15  # hard negatives pushed away
    # paraphrases closer: the random model puts every pair near cos 0.98, so "closer" is relative to the other
    # held-out sentences: the paraphrase's lead over them grows, and it becomes the nearest of 72 candidates
    assert before[3] < 0.05 and after[3] > 0.25 and after[3] > before[3] + 0.2
    assert before[4] < 0.2 and after[4] >= 0.6


def test_merge_equals_adapter_applied(tiny_dirs, trained, tmp_path):
    import argparse

    from e5v import E5V
    from e5v.cli.train import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["merge", "--model", str(tiny_dirs["e5v-like"]), "--adapter", str(trained),
                              "--out", str(tmp_path / "merged")])
    assert args.run(args) == 0
    texts = ["a dog is here number 7", "there is a car 3", "hello"]
    merged = E5V.from_pretrained(str(tmp_path / "merged")).encode_text(texts)
    applied = E5V.from_pretrained(str(tiny_dirs["e5v-like"]), adapter=str(trained)).encode_text(texts)
    base = E5V.from_pretrained(str(tiny_dirs["e5v-like"])).encode_text(texts)
    assert np.abs(merged - applied).max() < 1e-5 and np.abs(merged - base).max() > 1e-2
    with pytest.raises(ConfigError, match="not empty"):
        args.run(args)


def _run_train(cfg: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, "train", json.dumps(cfg)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_same_adapter(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    data = write_csv(tmp_path / "nli.csv", [triplet(i) for i in range(40)])
    kw = dict(max_steps=10, save_steps=3, batch_size=8, micro_batch_size=10, lora_dropout=0.1, save_total_limit=2)
    straight = _run_train(_cfg(tiny_dirs["e5v-like"], data, tmp_path / "straight", **kw))
    killed_cfg = _cfg(tiny_dirs["e5v-like"], data, tmp_path / "killed", **kw)
    proc = _run_train(killed_cfg)
    first = tmp_path / "killed" / "checkpoints" / "step-000003"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "killed" / "adapter").exists(), "the run was not killed mid-way"
    before_kill = [json.loads(x) for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()][:3]
    resumed = _run_train(killed_cfg)
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()[-3000:]
    assert straight.wait(timeout=180) == 0, straight.stderr.read()[-3000:]
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))  # no duplicate and no missing record across the kill
    assert log[:3] == before_kill  # steps 1-3 were not redone (their timings are the first run's): it resumed
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2  # save_total_limit


# --- settings that cannot train as expected, and uneven last batches --------------------------------------------
def test_small_data_with_the_default_batch_and_warmup_is_said(tiny_dirs, tmp_path, caplog):
    """The defaults (batch 768, 100 warm-up steps, 2 epochs) on 40 pairs: 2 steps whose learning rates are 0 and
    1 % of the peak. The run says so, with what will happen."""
    from e5v.train import train

    data = write_csv(tmp_path / "d.csv", [triplet(i) for i in range(40)])
    cfg = make_config(model=str(tiny_dirs["e5v-like"]), data=str(data), output_dir=str(tmp_path / "run"), lora_r=8,
                      gradient_checkpointing=False, progress=False, tensorboard=False)
    with caplog.at_level(logging.WARNING, logger="e5v.train"):
        train(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("batch_size 768 is larger than the data (40 pairs)" in m and "one step per epoch" in m for m in warned)
    assert any("warmup_steps 100 is not below the run's 2 step(s)" in m and "1% at the last" in m for m in warned)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert np.allclose([r["lr"] for r in log], [0.0, 4e-6], rtol=1e-9, atol=0)  # what the warning announced
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="e5v.train"):
        train(make_config(**{**cfg.to_dict(), "output_dir": str(tmp_path / "ok"), "batch_size": 16,
                             "warmup_steps": 1}))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.slow
def test_a_process_with_an_empty_shard_trains_and_resumes(tiny_dirs, tmp_path):
    """17 rows, batch 16, 2 processes: the second step has one row, so one process has nothing to embed. It joins
    the step (zero gradient), in the default mode and in the official-quirks layout; the runs and their resumption
    from the step-1 checkpoint end as one process does."""
    from safetensors.torch import load_file

    from e5v.train import train

    data = write_csv(tmp_path / "d.csv", [triplet(i) for i in range(17)])
    cfg = dict(model=str(tiny_dirs["e5v-like"]), data=str(data), output_dir=str(tmp_path / "runs"), batch_size=16,
               micro_batch_size=12, warmup_steps=1, learning_rate=2e-3, lora_r=8, lora_dropout=0.0, max_steps=2,
               save_steps=1, gradient_checkpointing=False, progress=False, tensorboard=False)
    variants = {"ddp": {}, "quirks": {"official_quirks": True, "official_world_size": 4}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER, "strategies", json.dumps(cfg),
           json.dumps(variants)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, variant in variants.items():
        train(make_config(**{**cfg, **variant, "output_dir": str(tmp_path / "one" / name)}))
        one = [json.loads(x) for x in (tmp_path / "one" / name / "log.jsonl").read_text().splitlines()]
        want = load_file(str(tmp_path / "one" / name / "adapter" / "adapter_model.safetensors"))
        for run in (name, name + "-resumed"):
            log = [json.loads(x) for x in (tmp_path / "runs" / run / "log.jsonl").read_text().splitlines()]
            assert [r["step"] for r in log] == [1, 2] and log[1]["candidates"] == 2  # step 2: one triplet
            assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(log, one, strict=True)), run
            got = load_file(str(tmp_path / "runs" / run / "adapter" / "adapter_model.safetensors"))
            assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5, run
        assert (tmp_path / "runs" / (name + "-resumed") / "log.jsonl").read_text().count('"before_kill"') == 1
