"""Every backbone family trains with the text-only recipe (issue 15): one optimiser step on toy triplets lowers the
loss on the same batch. (Training's vectors equal the engine's at step 0 for every family:
test_train_official.py::test_training_forward_equals_encode_text.)"""
from __future__ import annotations

import json

import pytest

from e5v.tiny import FAMILIES
from e5v.train import make_config, train

from support.training import triplet, write_csv


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_learns_on_toy_triplets(tiny_dirs, family, tmp_path):
    data = write_csv(tmp_path / "nli.csv", [triplet(i) for i in range(12)])
    cfg = make_config(model=str(tiny_dirs[family]), data=str(data), output_dir=str(tmp_path / "run"), batch_size=12,
                      micro_batch_size=36, max_steps=2, learning_rate=5e-3, warmup_steps=0, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, dtype="float32", device="cpu", save_steps=2, gradient_checkpointing=False,
                      progress=False, tensorboard=False)
    train(cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # one epoch is one step: both steps see the same 12 triplets, the second after one update
    assert len(losses) == 2 and losses[1] < losses[0] - 1e-3, losses


def test_official_quirks_refuse_a_template_chat_format(tiny_dirs, tmp_path):
    """official_quirks reproduces E5-V's own chat formats; a family rendered by its checkpoint's template is refused
    with the reason, not a KeyError."""
    from e5v.errors import ConfigError

    data = write_csv(tmp_path / "nli.csv", [triplet(i) for i in range(4)])
    cfg = make_config(model=str(tiny_dirs["gemma3"]), data=str(data), output_dir=str(tmp_path / "run"),
                      batch_size=4, max_steps=1, official_quirks=True, dtype="float32", device="cpu",
                      progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="official_quirks reproduces E5-V's own chat formats"):
        train(cfg)
