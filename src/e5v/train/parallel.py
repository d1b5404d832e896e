"""How one optimiser step is run across processes: plain DDP-style, DeepSpeed ZeRO-2/3, or FSDP2.

Every strategy gives the same step (tests: 2 processes of each equal one process): GradCache back-propagates
each chunk through :meth:`backward`; :meth:`step` sums the gradients of all processes, clips them, and takes
the AdamW and learning-rate step. The contrastive loss already scores every anchor of the global batch on
every process, so the per-process gradients must be *summed*; DeepSpeed and FSDP average them, hence the
backward tensor is multiplied by the world size there.

- :class:`Plain`: one process, or torch.distributed (torchrun / accelerate launch MULTI_GPU): one all-reduce of
  the LoRA gradients per step (:func:`e5v.train.loss.all_reduce_grads`); fp16 loss scaling with GradScaler.
- :class:`DeepSpeed`: ``deepspeed.initialize`` around the LoRA model with e5v's AdamW and schedule; "auto"
  values of the JSON config are filled from the settings (micro batch = this process's triplets, gradient
  accumulation 1, clipping, bf16/fp16). All chunks of a step are one accumulation window
  (``set_gradient_accumulation_boundary``): ZeRO reduces once, and ``engine.step`` runs once per global batch.
  Checkpoints: the engine's own (optimizer partitions, schedule), without the frozen base weights.
- :class:`FSDP`: torch's ``fully_shard`` (FSDP2) on every decoder layer (with images: every vision tower block
  too) and the language model; gradient sync only on the last chunk; checkpoints hold the full optimizer state (any
  world size can resume).

DeepSpeed and FSDP gather parameters and reduce gradients inside the forward and backward passes, so every process
must run the same modules the same number of times (``lockstep``): each process runs as many GradCache chunks as
the busiest one (weight-0 filler chunks), and with images each chunk runs the vision side (a dummy image, weight
0, where a chunk has none; :meth:`e5v.train.embed.EngineSentences.vision_in_lockstep`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from ..adapters import vision_modules
from ..errors import ConfigError
from .loss import all_reduce_grads
from .model import tower_blocks

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # sub-directory of a checkpoint holding DeepSpeed's files


def accelerate_choice(environ=os.environ) -> tuple[str, str]:
    """("deepspeed", config) / ("fsdp", "") / ("", ""): what an ``accelerate launch --config_file`` asked for
    (accelerate passes its yaml's choice to the processes in ACCELERATE_* variables)."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if path and path.lower() != "none":
            return "deepspeed", path
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return "deepspeed", json.dumps({"zero_optimization": {"stage": int(stage)}})
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp", ""
    return "", ""


def require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("deepspeed is set but the deepspeed package is not installed (pip install deepspeed); "
                          "the configs are in configs/deepspeed/") from None
    return deepspeed


def deepspeed_config(source: str, cfg, dtype: torch.dtype, world_size: int) -> dict:
    """The DeepSpeed config of a JSON file (or inline JSON), its "auto" values filled from the settings.
    Settings that would break the GradCache step or contradict e5v's are a ConfigError."""
    text = source
    if not source.lstrip().startswith("{"):
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the DeepSpeed config ({exc.strerror or exc})") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{source}: remove the {key!r} section; e5v builds AdamW and the linear schedule "
                              "from its own settings (--learning-rate, --warmup-steps ...)")
    micro = math.ceil(cfg.batch_size / world_size)
    wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
              "train_batch_size": micro * world_size, "gradient_clipping": cfg.max_grad_norm}
    hints = {"gradient_accumulation_steps": "GradCache takes one optimiser step per global batch; "
                                            "--micro-batch-size sets the memory use",
             "gradient_clipping": "--max-grad-norm"}
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and float(given) != value:
            raise ConfigError(f"{source}: {key} is {given}, but e5v's settings give {value}; set it to \"auto\" "
                              f"({hints.get(key, '--batch-size over the processes')})")
        ds[key] = value
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {})
        given = section.get("enabled", "auto")
        if given != "auto" and bool(given) != on:
            raise ConfigError(f"{source}: {key}.enabled is {given} but the training dtype is {dtype} (--dtype)")
        section["enabled"] = on
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW
    ds.setdefault("steps_per_print", 2 ** 31 - 1)  # e5v logs every step itself
    return ds


def _check_finite(norm: float) -> None:
    if not math.isfinite(norm):
        raise FloatingPointError(f"non-finite gradient norm {norm}; try --dtype bfloat16/float32 or a lower "
                                 "learning rate")


def _require_optimizer_state(folder: Path, state: dict) -> None:
    if "optimizer" not in state:
        raise ConfigError(f"{folder} was written by DeepSpeed; resume with the same launcher and --deepspeed config")


class Plain:
    """One process, or gradients summed with one all-reduce (torchrun / accelerate launch MULTI_GPU)."""

    name = "ddp"
    lockstep = False  # one all-reduce per step: processes may run different chunks

    def __init__(self, model, make_optimizer, make_scheduler, *, max_grad_norm: float, scaler=None):
        self.model, self.scaler = model, scaler
        self.optimizer = make_optimizer(model.trainable)
        self.scheduler = make_scheduler(self.optimizer)
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.runner = model.runner

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, tensor: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(tensor) if self.scaler is not None else tensor).backward()

    def step(self) -> float:
        """Sum, unscale and clip the gradients, then the optimiser and schedule step; returns the gradient norm."""
        all_reduce_grads(self.model.trainable)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.trainable, self.max_grad_norm))
        if self.scaler is not None:  # an overflow skips the step and lowers the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            _check_finite(norm)
            self.optimizer.step()
        self.scheduler.step()
        return norm

    def full_weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_trainable().items()}

    def save(self, folder: Path) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load(self, folder: Path, state: dict) -> None:
        _require_optimizer_state(folder, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


class _EngineModule(torch.nn.Module):
    """What DeepSpeed wraps: the module that holds every trainable parameter (the peft model; the multimodal base
    model for data with images); its forward runs the encoder's runner (the base LM with LoRA, or that base)."""

    def __init__(self, model):
        super().__init__()
        self.peft = model.root  # the attribute's name keys DeepSpeed's checkpoints: kept for their resumption
        self.run = (model.runner,)  # in a tuple: not registered twice

    def forward(self, **batch):
        return self.run[0](**batch)


class DeepSpeed:
    """``deepspeed.initialize`` (ZeRO-2/3) with e5v's optimizer and schedule; one engine step per global batch."""

    name = "deepspeed"
    lockstep = True

    def __init__(self, model, make_optimizer, make_scheduler, *, ds_config: dict, world_size: int):
        deepspeed = require_deepspeed()
        self.model, self.world_size = model, world_size
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        optimizer = make_optimizer(model.trainable)
        self.scheduler = make_scheduler(optimizer)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_EngineModule(model), optimizer=optimizer, lr_scheduler=self.scheduler, config=ds_config)
        self.runner = self.engine  # the engine's forward: ZeRO-3 gathers parameters, counts backward passes

    def zero_grad(self) -> None:
        pass  # the engine clears gradients after its step

    def backward(self, tensor: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(tensor * self.world_size)  # DeepSpeed averages over processes; the loss wants a sum

    def step(self) -> float:
        """The engine's step (clipping, optimiser, schedule; an fp16 overflow skips it); the gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, gathered from their ZeRO-3 partitions (a collective: every process calls it)."""
        named = self.model.named_trainable()
        gather = nullcontext()
        if self.stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(named.values()))
        with gather:
            return {n: p.detach().to("cpu", copy=True) for n, p in named.items()}

    def save(self, folder: Path) -> dict:
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, exclude_frozen_parameters=True)
        return {}

    def load(self, folder: Path, state: dict) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"{folder}: no DeepSpeed state in this checkpoint (written by another strategy?)")


class FSDP:
    """FSDP2 (``fully_shard``) on every decoder layer and the language model (with images: every block of the
    vision tower too, and the multimodal base model, whose unit holds the rest of the vision side and the LM's
    embeddings)."""

    name = "fsdp"
    lockstep = True

    def __init__(self, model, make_optimizer, make_scheduler, *, max_grad_norm: float, dtype: torch.dtype,
                 world_size: int):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model, self.world_size = model, world_size
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        lm = model.lm
        units = set(getattr(lm, "_no_split_modules", None) or ())
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
            else MixedPrecisionPolicy()
        layers = [m for m in lm.modules() if type(m).__name__ in units]
        if not layers:
            raise ConfigError(f"FSDP: no decoder layer ({sorted(units)}) found in {type(lm).__name__}")
        if model.mm is not None:
            layers += list(tower_blocks(model.mm.get_submodule(vision_modules(model.mm)[0]))[1])
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model.runner, mp_policy=mp)  # the rest of the runner (the multimodal one embeds the tokens)
        self.runner = model.runner
        self.optimizer = make_optimizer(model.trainable)  # after sharding: the optimizer holds the shards
        self.scheduler = make_scheduler(self.optimizer)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, tensor: torch.Tensor, last: bool) -> None:
        self.runner.set_requires_gradient_sync(last)  # reduce-scatter once, after the step's last chunk
        (tensor * self.world_size).backward()  # FSDP averages over processes; the loss wants a sum

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.trainable, self.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        _check_finite(norm)
        self.optimizer.step()
        self.scheduler.step()
        return norm

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weights, all-gathered from their shards (a collective: every process calls it)."""
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for n, p in self.model.named_trainable().items()}

    def save(self, folder: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.runner, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"optimizer": optim, "scheduler": self.scheduler.state_dict()}

    def load(self, folder: Path, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        _require_optimizer_state(folder, state)
        set_optimizer_state_dict(self.runner, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])


def make_strategy(cfg, model, make_optimizer, make_scheduler, *, dtype: torch.dtype, device: torch.device,
                  world_size: int, quantized: bool):
    """The strategy the settings (or ``accelerate launch``'s yaml) ask for: deepspeed, fsdp, else plain."""
    kind, source = ("deepspeed", cfg.deepspeed) if cfg.deepspeed else ("fsdp", "") if cfg.fsdp \
        else accelerate_choice()
    if kind == "deepspeed":
        ds = deepspeed_config(source, cfg, dtype, world_size)
        if cfg.compile:
            raise ConfigError("--compile is not supported with DeepSpeed here; drop one of them")
        if quantized and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:
            raise ConfigError("4-bit QLoRA weights cannot be partitioned by ZeRO-3; use --load-in-4bit false "
                              "or ZeRO-2")
        log.info("DeepSpeed ZeRO-%s on %d process(es)", ds.get("zero_optimization", {}).get("stage", 0),
                 world_size)
        return DeepSpeed(model, make_optimizer, make_scheduler, ds_config=ds, world_size=world_size)
    if kind == "fsdp" and world_size == 1:
        log.info("FSDP asked for on one process: nothing to shard, running the plain step")
    elif kind == "fsdp":
        if quantized:
            raise ConfigError("4-bit QLoRA weights cannot be sharded by FSDP; use --load-in-4bit false")
        if dtype == torch.float16:
            raise ConfigError("FSDP runs in bfloat16 or float32 here (--dtype), not float16")
        log.info("FSDP2 (fully_shard) on %d process(es)", world_size)
        return FSDP(model, make_optimizer, make_scheduler, max_grad_norm=cfg.max_grad_norm, dtype=dtype,
                    world_size=world_size)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None
    return Plain(model, make_optimizer, make_scheduler, max_grad_norm=cfg.max_grad_norm, scaler=scaler)
