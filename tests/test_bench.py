"""``e5v bench`` runs end to end on CPU with the tiny-width model of the real architecture, and both paths
agree. Its speed is not checked here (speed lives in benchmarks/, measured on the target device)."""
from __future__ import annotations

import json

from e5v.bench import IMAGE_TOKEN_ID, LLAMA3_SPECIALS, build_config, offline_tokenizer
from e5v.cli import main


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


def test_bench_cli_on_cpu(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(["bench", "--tiny", "--device", "cpu", "--images", "2", "--texts", "6", "--workers", "1",
               "--variants", "packed", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["what"], r["path"]): r for r in result["rows"]}
    for what in ("images", "texts"):
        assert rows[(what, "official recipe")]["items/s"] > 0
        for path in ("e5v", "e5v packed"):
            assert rows[(what, path)]["min cosine"] >= 0.99999, (what, path)  # fp32: the same vectors
    full, capped = rows[("images", "e5v")], rows[("images, AnyRes capped", "e5v, max 1 tile(s)")]
    per_image = full["tokens/s"] / full["items/s"]
    assert 2300 < per_image < 2400  # real E5-V geometry: 640x480 -> 2,340 image tokens, + the prompt
    assert capped["tokens/s"] / capped["items/s"] < per_image / 2 and capped["min cosine"] < 0.9999
    assert rows[("image preprocessing", "1 worker process")]["items/s"] > 0
    assert result["meta"]["transformers"] and "tiny" in result["meta"]["model"]
    assert md.read_text().count("\n| ") == len(result["rows"]) + 1  # header + one line per measurement
    assert "smallest cosine between the official recipe and e5v: 1.0000" in capsys.readouterr().out
