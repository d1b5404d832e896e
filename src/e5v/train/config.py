"""Training settings: one dataclass whose defaults are the official E5-V run's (its launch and training scripts),
loadable from a YAML or JSON file, every field also a command-line flag (flags override the file)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import EngineConfig
from ..errors import ConfigError


@dataclass
class TrainConfig:
    model: str = ""                  # base checkpoint (hub id or directory), e.g. a llama3-llava-next-8b copy
    data: str = ""                   # .csv (sent0,sent1,hard_neg), .jsonl or .parquet; several: a.csv,b.jsonl
    image_root: str = ""             # relative image paths: relative to this folder (empty: the data file's)
    data_weights: str = ""           # several files: each one's share of a batch ("0.7,0.3"); empty: by size
    single_source_batches: bool = False  # several files: each global batch from one file, drawn by data_weights
    output_dir: str = "e5v-train"    # checkpoints/, adapter/, log.jsonl
    prompt: str = ""                 # inner prompt with <sent>; empty: e5v's text prompt (the inference one)
    chat_format: str = ""            # llama3, mistral, vicuna, qwen; empty: detected from the tokenizer
    cutoff_len: int = 32             # tokens per sentence (the prompt is not cut)
    official_quirks: bool = False    # reproduce the released step (e5v.train.official): prompt, paddings, layout
    official_world_size: int = 32    # the released run's GPUs: official_quirks pads batch_size / this per group
    batch_size: int = 768            # global contrastive batch, in triplets (all processes together)
    micro_batch_size: int = 72       # at most this many sequences per forward pass (24 triplets, the official)
    micro_batch_tokens: int = 16384  # ... and padded tokens, as the engine's max_batch_tokens
    sort_by_length: bool = True      # chunks of similar lengths: less padding, same gradients
    epochs: float = 2.0
    max_steps: int = 0               # > 0: stop after this many optimiser steps (overrides epochs)
    learning_rate: float = 4e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    load_in_4bit: str = "auto"       # true, false, auto (QLoRA NF4 when bitsandbytes and a GPU are present)
    load_vision: bool = False        # load the whole multimodal model (the vision tower stays frozen)
    train_projector: bool = False    # data with images: also train the projector's weights
    vision_lora: bool = False        # data with images: also LoRA (lora_r, lora_alpha) on the vision tower
    anyres_max_tiles: int = 0        # images as the engine's --anyres-max-tiles (0: the checkpoint's own)
    image_max_pixels: int = 0        # ... --image-max-pixels (0: the checkpoint's own)
    max_pixels: int = 0              # ... the engine's decoded-image limit (0: its default)
    alpha: str = "white"             # ... how transparent images become RGB: white, official
    dtype: str = "auto"              # auto: bf16 on a GPU that has it, else fp16; fp32 on CPU
    gradient_checkpointing: bool = True
    attn_implementation: str = ""    # sdpa, eager, flash_attention_2 ...
    compile: bool = False            # torch.compile the language model
    device: str = ""                 # cuda, cpu; empty: cuda (this process's local rank) if available
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int = 3        # checkpoints kept (older ones deleted)
    logging_steps: int = 1
    tensorboard: bool = True         # also log to TensorBoard when it is installed
    deepspeed: str = ""              # DeepSpeed JSON config (ZeRO-2/3, configs/deepspeed/); needs deepspeed
    fsdp: bool = False               # shard with torch FSDP2 (fully_shard) across the processes
    progress: bool = True

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def validate(self) -> "TrainConfig":
        if not self.model:
            raise ConfigError("no base model: set model (--model)")
        if not self.data:
            raise ConfigError("no training data: set data (--data)")
        for name in ("batch_size", "micro_batch_size", "micro_batch_tokens", "cutoff_len", "lora_r", "save_steps",
                     "logging_steps", "official_world_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("anyres_max_tiles", "image_max_pixels", "max_pixels"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be positive, or 0 for the default, got {getattr(self, name)}")
        if self.deepspeed and self.fsdp:
            raise ConfigError("choose one of deepspeed and fsdp")
        if self.official_quirks and (self.train_projector or self.vision_lora):
            raise ConfigError("official_quirks is the text-only release; drop train_projector and vision_lora")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def engine_config(self) -> EngineConfig:
        """The image settings as the engine's options (0: unset), so that training sees images as serving does."""
        return EngineConfig(anyres_max_tiles=self.anyres_max_tiles or None,
                            image_max_pixels=self.image_max_pixels or None, max_pixels=self.max_pixels or None,
                            alpha=self.alpha)


def read_config_file(path) -> dict:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or exc})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def make_config(file_values: dict | None = None, **overrides) -> TrainConfig:
    """Defaults < values of a config file < ``overrides`` (keys with ``-`` or ``_``)."""
    known = {f.name: f for f in fields(TrainConfig)}
    values: dict = {}
    for src in (file_values or {}, overrides):
        for key, value in src.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown training setting {key!r}")
            values[name] = value
    cfg = TrainConfig(**values)
    for f in fields(cfg):  # files give strings or ints where floats are meant; flags are already typed
        v = getattr(cfg, f.name)
        if f.type in ("int", "float") and isinstance(v, (str, int, float)) and not isinstance(v, bool):
            try:
                setattr(cfg, f.name, int(v) if f.type == "int" else float(v))
            except ValueError:
                raise ConfigError(f"{f.name} must be a number, got {v!r}") from None
        elif f.type == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{f.name} must be true or false, got {v!r}")
        elif f.type == "str" and not isinstance(v, str):
            setattr(cfg, f.name, str(v).lower() if isinstance(v, bool) else str(v))
    return cfg


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting (``--batch-size``, ``--gradient-checkpointing/--no-gradient-checkpointing``...).
    Unset flags are absent from the namespace, so that a config file's value is not overridden by a default."""
    p.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    types = {"int": int, "float": float, "str": str}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default: {default})")
        else:
            p.add_argument(flag, type=types[f.type], default=argparse.SUPPRESS, help=f"(default: {default!r})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return make_config(read_config_file(args.config) if args.config else None, **overrides)


__all__ = ["TrainConfig", "make_config", "read_config_file", "add_config_flags", "config_from_args"]
