"""Training across processes: DeepSpeed ZeRO-2/3 and FSDP2 give the plain (DDP-style) run's losses and adapter,
resume exactly; the DeepSpeed config's "auto" values; every shipped accelerate yaml and config is honoured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e5v.errors import ConfigError
from e5v.train.config import make_config, read_config_file
from e5v.train.parallel import accelerate_choice, deepspeed_config

from e5v.serve.server import free_port
from support import ROOT
from e5v.adapters import VISION_FILE
from support.training import WORKER, env, image_rows, triplet, write_csv

ZERO2, ZERO3 = str(ROOT / "configs/deepspeed/zero2.json"), str(ROOT / "configs/deepspeed/zero3.json")


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _run_strategies(tmp_path, cfg: dict, variants: dict, *, files=("adapter_model.safetensors",), close=None):
    """Train ``cfg`` on 2 processes once per variant (and resumed from step 1): every variant ends with the losses,
    gradient norms and weights (each file of ``files``) of the plain all-reduce run, and its resumption with the
    same weights exactly. ``close(a, b)``: the gradient-norm check (default: 1e-5 apart)."""
    from safetensors.torch import load_file

    close = close or (lambda a, b: abs(a - b) < 1e-5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER, "strategies", json.dumps(cfg),
           json.dumps(variants)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def run(name):
        folder = tmp_path / "runs" / name
        log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
        weights = {}
        for f in files:
            weights.update({f"{f}:{k}": v for k, v in load_file(str(folder / "adapter" / f)).items()})
        return log, weights

    ref_log, ref = run("ddp")
    for name in variants:
        log, weights = run(name)
        assert weights.keys() == ref.keys()
        for r, want in zip(log, ref_log, strict=True):
            assert abs(r["loss"] - want["loss"]) < 1e-5 and close(r["grad_norm"], want["grad_norm"]), name
        assert max(float((weights[k] - ref[k]).abs().max()) for k in ref) < 1e-5, name
        resumed_log, resumed = run(name + "-resumed")
        assert resumed_log[0].get("before_kill"), f"{name}: the second run did not resume from step 1"
        assert [r["step"] for r in resumed_log] == [1, 2]
        assert all(torch.equal(resumed[k], weights[k]) for k in weights), name
    return ref_log, ref


@pytest.mark.slow
def test_strategies_equal_plain_and_resume_exactly(tiny_dirs, tmp_path):
    """2 processes, 2 steps, GradCache chunks and LoRA dropout on: ZeRO-2, ZeRO-3 and FSDP2 end with the losses,
    gradient norms and adapter of the plain all-reduce run (itself equal to one process: test_train.py); each run
    resumed from its step-1 checkpoint ends with the same adapter as without the interruption."""
    from safetensors.torch import load_file

    variants = {"ddp": {}, "fsdp": {"fsdp": True}}
    if _has_deepspeed():
        variants.update(zero2={"deepspeed": ZERO2}, zero3={"deepspeed": ZERO3})
    data = write_csv(tmp_path / "d.csv", [triplet(i) for i in range(24)])
    cfg = dict(model=str(tiny_dirs["e5v-like"]), data=str(data), output_dir=str(tmp_path / "runs"), batch_size=12,
               micro_batch_size=8, warmup_steps=1, learning_rate=2e-3, lora_r=8, lora_dropout=0.1, max_steps=2,
               save_steps=1, gradient_checkpointing=False, progress=False)
    ref_log, ref = _run_strategies(tmp_path, cfg, variants)
    assert [r["step"] for r in ref_log] == [1, 2] and all(r["chunks"] == 3 for r in ref_log)
    base = load_file(str(tmp_path / "runs" / "ddp" / "checkpoints" / "step-000001" / "adapter_model.safetensors"))
    ref = {k.split(":", 1)[1]: v for k, v in ref.items()}
    assert max(float((ref[k] - base[k]).abs().max()) for k in ref) > 1e-3  # step 2 really moved the weights
    if _has_deepspeed():  # DeepSpeed's own checkpoint: optimizer partitions of both ranks, no frozen base weights
        ds = tmp_path / "runs" / "zero2" / "checkpoints" / "step-000002" / "deepspeed"
        assert len(list(ds.glob("zero_pp_rank_*_optim_states.pt"))) == 2
        saved = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        assert saved and all("lora_" in k for k in saved)


@pytest.mark.slow
def test_strategies_with_images_equal_plain_and_resume_exactly(tiny_dirs, tmp_path):
    """Image sides, LoRA on the LM and the tower, the projector trained, LoRA dropout on; a corrupt image skipped.
    The processes' shards differ: one runs an image chunk where the other runs texts only, and at step 2 one runs
    2 chunks, the other 3. ZeRO-2, ZeRO-3 (every parameter partitioned: persistence threshold 0) and FSDP2 keep
    the processes in lockstep (filler chunks, a weight-0 dummy image) and end as the plain run, resumed too."""
    variants = {"ddp": {}, "fsdp": {"fsdp": True}}
    if _has_deepspeed():
        zero3 = json.loads(Path(ZERO3).read_text())
        zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "zero3.json").write_text(json.dumps(zero3))
        variants.update(zero2={"deepspeed": ZERO2}, zero3={"deepspeed": str(tmp_path / "zero3.json")})
    data = image_rows(tmp_path, 12, corrupt=(1,))
    cfg = dict(model=str(tiny_dirs["e5v-like"]), data=str(data), output_dir=str(tmp_path / "runs"), batch_size=6,
               micro_batch_size=3, warmup_steps=0, learning_rate=2e-3, lora_r=4, lora_dropout=0.1, max_steps=2,
               save_steps=1, gradient_checkpointing=False, progress=False, tensorboard=False, train_projector=True,
               vision_lora=True)
    ref_log, ref = _run_strategies(tmp_path, cfg, variants, files=("adapter_model.safetensors", VISION_FILE),
                                   close=lambda a, b: abs(a - b) <= 1e-6 * b)  # norms of about 100
    assert [r["skipped"] for r in ref_log] == [0, 1] and all(r["images_per_s"] > 0 for r in ref_log)
    assert any(k.startswith(f"{VISION_FILE}:vision_tower.") for k in ref)


def test_deepspeed_config_auto_values_and_errors(tmp_path):
    cfg = make_config(model="m", data="d", batch_size=768, max_grad_norm=0.5)
    ds = deepspeed_config(ZERO2, cfg, torch.bfloat16, world_size=32)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_accumulation_steps"]) \
        == (24, 768, 1)  # the official 24 triplets x 32 GPUs
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"]
    assert deepspeed_config(ZERO3, cfg, torch.float16, 2)["fp16"] == {
        "enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    bad = json.loads(Path(ZERO2).read_text())
    for change, message in [({"gradient_accumulation_steps": 4}, "GradCache"),
                            ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer'"),
                            ({"bf16": {"enabled": True}}, "training dtype")]:
        (tmp_path / "ds.json").write_text(json.dumps({**bad, **change}))
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(str(tmp_path / "ds.json"), cfg, torch.float32, 2)
    with pytest.raises(ConfigError, match="choose one"):
        make_config(model="m", data="d", deepspeed=ZERO2, fsdp=True).validate()


@pytest.mark.parametrize("name, want", [("deepspeed-zero2", ("deepspeed", "configs/deepspeed/zero2.json")),
                                        ("deepspeed-zero3", ("deepspeed", "configs/deepspeed/zero3.json")),
                                        ("fsdp", ("fsdp", "")), ("multi-gpu", ("", "")), ("multi-node", ("", ""))])
def test_accelerate_yamls_reach_the_loop(name, want):
    """accelerate's own launcher code turns each shipped yaml into the processes' environment; the loop reads
    the strategy it names (and the DeepSpeed config file exists and is valid)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    yaml = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(yaml), "-m", "e5v.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its deepspeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, environ = prepare_deepspeed_cmd_env(args)
    else:
        environ = prepare_multi_gpu_env(args)
    assert accelerate_choice(environ) == want
    assert environ.get("ACCELERATE_MIXED_PRECISION", "no") == "no"  # e5v's --dtype decides
    if want[0] == "deepspeed":
        deepspeed_config(str(ROOT / want[1]), make_config(), torch.float32, 8)


def test_official_run_config_file():
    cfg = make_config(read_config_file(ROOT / "configs" / "train" / "e5v.yaml")).validate()
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.epochs, cfg.learning_rate, cfg.warmup_steps) == \
        (768, 72, 2.0, 4e-4, 100)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.cutoff_len, cfg.temperature) == (64, 16, 0.05, 32, 0.05)
    assert cfg.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (cfg.save_steps, cfg.save_total_limit, cfg.seed, cfg.gradient_checkpointing) == (50, 100, 42, True)
    assert cfg.deepspeed == "configs/deepspeed/zero2.json" and (ROOT / cfg.deepspeed).is_file()
    # the released DeepSpeed run averaged the gradient over its 32 GPUs, then clipped at 1.0 (Adam eps 1e-8); e5v sums
    assert cfg.official_world_size == 32 and cfg.batch_size // cfg.official_world_size == 24
    assert (cfg.max_grad_norm, cfg.adam_epsilon) == (32 * 1.0, 32 * 1e-8)

