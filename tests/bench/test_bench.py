"""``e5v bench`` runs end to end on CPU with the tiny-width model of the real architecture, and both paths
agree. Its speed is not checked here (speed lives in benchmarks/, measured on the target device)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from e5v.bench.model import CONFIG, IMAGE_TOKEN_ID, LLAMA3_SPECIALS, build_config, offline_tokenizer
from e5v.bench.report import summarize
from e5v.cli import build_parser, main

from support import ROOT


def test_offline_tokenizer_has_the_e5v_ids():
    tok = offline_tokenizer(128320)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID == 128256
    assert tok.bos_token_id == LLAMA3_SPECIALS["<|begin_of_text|>"] and tok.eos_token_id == 128009
    ids = tok("<|start_header_id|>user<|end_header_id|>\n\n<image>\nA dog runs, déjà vu 🐕.<|eot_id|>")["input_ids"]
    assert ids[0] == 128000 and ids[1] == 128006 and 128256 in ids and ids[-1] == 128009  # BOS, no EOS added
    assert max(ids) < 128320 and tok.unk_token_id is None
    assert tok.decode([i for i in ids if i < 128000]).endswith("A dog runs, déjà vu 🐕.")


def test_real_config_is_the_e5v_architecture():
    cfg = build_config()
    assert cfg.text_config.vocab_size == 128320 and cfg.text_config.num_hidden_layers == 32
    assert cfg.vision_config.image_size == 336 and cfg.image_token_id == IMAGE_TOKEN_ID
    tiny = build_config(tiny=True)
    assert tiny.text_config.hidden_size == 64 and tiny.image_grid_pinpoints == cfg.image_grid_pinpoints


@pytest.mark.slow
def test_the_architecture_ships_with_the_package():
    """The default ``--config`` is package data (an installed e5v has no checkout around it)."""
    import e5v

    args = build_parser().parse_args(["bench", "--tiny"])
    assert Path(args.config) == CONFIG and CONFIG.is_file()
    assert CONFIG.resolve().is_relative_to(Path(e5v.__file__).resolve().parent)


@pytest.mark.parametrize("device, want", [("cpu", "float32"), ("cuda", "float16")])
def test_dtype_auto_is_the_engines(monkeypatch, device, want):
    """``--dtype auto`` resolves as the engine's (fp16 on a GPU, fp32 on a CPU), not bench's own choice."""
    import torch

    from e5v import bench
    from e5v.bench import measure
    from e5v.config import resolve_dtype

    def start(args, device, dtype):
        raise _Started(device, dtype)

    monkeypatch.setattr(measure.Session, "start", staticmethod(start))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    args = build_parser().parse_args(["bench", "--tiny", "--device", device])
    assert args.dtype == "auto"
    with pytest.raises(_Started) as started:
        bench.run(args)
    assert started.value.args == (torch.device(device), getattr(torch, want))
    assert started.value.args[1] == resolve_dtype("auto", torch.device(device))


class _Started(Exception):
    pass


def test_embed_speed_script_runs_the_bench_verb():
    """benchmarks/embed_speed.py passes its arguments on to ``e5v bench``."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "embed_speed.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: e5v bench") and "--image-batches" in done.stdout


@pytest.mark.slow
def test_bench_cli_on_cpu(tmp_path, capsys, monkeypatch):
    from transformers import LlavaNextForConditionalGeneration

    real = LlavaNextForConditionalGeneration.set_attn_implementation

    def no_flex(self, impl):  # the optional FlexAttention step fails: recorded as a row, the others are kept
        if "flex_attention" in str(impl):
            raise RuntimeError("no compiler here")
        return real(self, impl)

    monkeypatch.setattr(LlavaNextForConditionalGeneration, "set_attn_implementation", no_flex)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(["bench", "--tiny", "--device", "cpu", "--images", "2", "--texts", "6", "--workers", "1",
               "--image-batches", "1,2", "--text-batches", "3,6", "--variants", "packed,flex",
               "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["what"], r["path"], r.get("batch")): r for r in result["rows"]}
    assert len(rows) == len(result["rows"])  # one row per (what, path, batch)
    budget = "<= 16384 tok"
    for what, batches in (("images", (1, 2)), ("texts", (3, 6))):
        for b in batches:  # the official recipe and the engine at the same batch sizes (peak-memory target)
            assert rows[(what, "official recipe", b)]["items/s"] > 0
            assert rows[(what, "e5v", b)]["min cosine"] >= 0.99999, (what, b)
        for path in ("e5v", "e5v packed"):
            assert rows[(what, path, budget)]["min cosine"] >= 0.99999, (what, path)  # fp32: the same vectors
    for what in ("images", "texts"):  # every path sees the same inputs, token for token
        assert len({r["tokens"] for r in result["rows"] if r["what"] == what}) == 1, what
    assert 32 <= float(rows[("texts", "official recipe", 3)]["note"].split()[0]) <= 55  # prompt + caption
    full, capped = rows[("images", "e5v", budget)], rows[("images, AnyRes capped", "e5v, max 1 tile(s)", budget)]
    per_image = full["tokens"] / full["items"]
    assert 2300 < per_image < 2400  # real E5-V geometry: 640x480 -> 2,340 image tokens, + the prompt
    assert capped["tokens"] / capped["items"] < per_image / 2 and capped["min cosine"] < 0.9999
    assert rows[("image preprocessing", "1 worker process", None)]["items/s"] > 0
    assert "failed: RuntimeError: no compiler here" in rows[("texts and images", "e5v packed flex", None)]["note"]
    assert result["meta"]["transformers"] and "tiny" in result["meta"]["model"]
    assert md.read_text().count("\n| ") == len(result["rows"]) + 1  # header + one line per measurement
    summary = result["summary"]
    assert summary[0].startswith("images/s at full AnyRes: e5v best") and summary[1].startswith("texts/s: e5v best")
    assert any(line.startswith("image decoding + preprocessing") for line in summary)
    assert all(f"- {line}" in md.read_text() for line in summary)
    assert "smallest cosine between the official recipe and e5v: 1.0000" in capsys.readouterr().out


def test_summary_reads_the_targets():
    rows = [
        {"what": "images", "path": "official recipe", "batch": 1, "items/s": 9.7, "peak GiB": 17.6},
        {"what": "images", "path": "official recipe", "batch": 8, "items/s": 9.2, "peak GiB": 30.3},
        {"what": "images", "path": "e5v", "batch": "<= 16384 tok", "items/s": 16.5, "peak GiB": 25.0,
         "min cosine": 0.9995},
        {"what": "images", "path": "e5v", "batch": 1, "items/s": 12.0, "peak GiB": 16.4, "min cosine": 0.9991},
        {"what": "images", "path": "e5v", "batch": 8, "items/s": 13.0, "peak GiB": 21.4, "min cosine": 0.9993},
        {"what": "image preprocessing", "path": "1 process", "items/s": 8.0},
        {"what": "image preprocessing", "path": "8 worker processes", "items/s": 60.0},
    ]
    summary = summarize(rows)
    assert summary[0] == ("images/s at full AnyRes: e5v best 16.5 (e5v, batch <= 16384 tok), official recipe best 9.7 "
                          "(official recipe, batch 1), x1.70; smallest cosine to the official recipe over all e5v "
                          "paths 0.9991 (target >= 16 images/s, cosine >= 0.999)")
    assert summary[1:3] == [
        "peak memory, images at batch 1: e5v 16.4 GiB, official recipe 17.6 GiB (target: no higher)",
        "peak memory, images at batch 8: e5v 21.4 GiB, official recipe 30.3 GiB (target: no higher)"]
    assert summary[3].startswith("image decoding + preprocessing: 60.0 images/s (8 worker processes)")
    assert summary[3].endswith("keeps up")
    rows[-1]["items/s"] = 12.0
    assert "too slow, the model waits" in summarize(rows)[3]


def _dry_run_gpu_all(tmp_path, tiny: bool) -> tuple[list[list[str]], list[int], str]:
    """Run benchmarks/gpu_all.sh with stand-ins for the interpreter and for ``timeout`` that only record how
    they are called: the GPU branch's arguments are checked here, on a machine without a GPU."""
    import os
    import stat

    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(parents=True)
    fake_python = bin_dir / "python"
    fake_python.write_text(f"#!{sys.executable}\nimport json, sys\n"
                           f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake_timeout = bin_dir / "timeout"  # timeout -k GRACE LIMIT CMD...: record LIMIT + GRACE, run CMD
    fake_timeout.write_text(f"#!/bin/sh\necho \"$2 $3\" >> {tmp_path / 'limits'}\nshift 3\nexec \"$@\"\n")
    for f in (fake_python, fake_timeout):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(fake_python),
           "OUT": str(tmp_path / "out"), "E5V_BENCH_TINY": "1" if tiny else "0"}
    env.pop("EMBED_S", None), env.pop("TRAIN_S", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    limits = [sum(map(int, line.split())) for line in (tmp_path / "limits").read_text().splitlines()]
    return calls, limits, done.stdout


def test_gpu_script_arguments_are_valid_and_fit_ten_minutes(tmp_path):
    for tiny in (False, True):
        calls, limits, stdout = _dry_run_gpu_all(tmp_path / str(tiny), tiny)
        embed = next(c for c in calls if c and c[0].endswith("embed_speed.py"))
        assert any(c and c[0].endswith("train_step.py") for c in calls)
        args = build_parser().parse_args(["bench", *embed[1:]])  # every flag exists and parses
        assert args.out.name == "embed_speed.json" and args.markdown.name == "embed_speed.md"
        if tiny:
            assert args.tiny and args.device == "cpu"
        else:  # the full architecture in bf16 on the GPU, both official batch sizes, every engine path
            assert not args.tiny and args.device == "cuda" and args.dtype == "bfloat16" and args.images >= 64
            assert args.image_batches == "1,8" and args.text_batches == "15,256" and args.workers >= 4
            assert set(args.variants.split(",")) == {"packed", "grouped", "flex"}
            assert len(limits) == 3 and sum(limits) <= 560  # embed, train, train with images: < 10 min
        assert "gpu_all: exit 0" in stdout
