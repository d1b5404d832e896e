"""One engine configuration: :class:`EngineConfig` is the single source of the options that load and run an
:class:`~e5v.encoder.E5V` engine.  ``E5V.from_pretrained`` takes them, the CLI's model flags are generated from
its fields, and :meth:`EngineConfig.vector_settings` names the ones that change the vectors (the fingerprint
that an embedding run, an index and an evaluation cache record, so that vectors from two spaces never mix).

Words: ``dtype`` is always the *compute* precision of the model (as in transformers); the precision in which
vectors are *stored* is called ``precision`` (``e5v embed --precision``, an index's ``precision``).
``dtype="auto"`` means the official recipe's choice for the job: fp32 on CPU; on a GPU fp16 for embedding
(the official inference dtype), bf16 for training where the GPU has it (fp16 training needs loss scaling).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
CHAT_FORMATS = ("llama3", "mistral", "vicuna", "qwen", "template", "raw")
PACKING = {"auto": "auto", "on": True, "off": False}


def count(minimum: int = 1):
    """An argparse type: an integer of at least ``minimum`` (0 or a negative count would fail deep inside)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _option(default, help: str | None = None, *, flag: str | None = None, vectors: bool = False,
            engine: bool = False, **argparse_options):
    """A field of :class:`EngineConfig`: its default; with ``help`` its CLI flag (``--`` + the name with dashes
    unless ``flag``); whether it changes the vectors; whether it is an option of the
    :class:`~e5v.encoder.E5V` constructor (``engine``; the others load the backbone)."""
    metadata: dict[str, Any] = {"vectors": vectors, "engine": engine}
    if help is not None:
        metadata.update(help=help, flag=flag, cli=argparse_options)
    return field(default=default, metadata=metadata)


@dataclass
class EngineConfig:
    """Everything that loads and runs an engine.  ``E5V.from_pretrained(model, **options)`` takes the same names."""

    model: str | None = _option(None, "hub id (e.g. royokong/e5-v) or local checkpoint directory", vectors=True)
    adapter: str | None = _option(None, "LoRA adapter directory to merge", vectors=True)
    device: str | None = _option(None, "cuda, cuda:1, cpu (default: cuda if available)")
    dtype: str = _option("auto", "compute precision: auto, bfloat16, float16, float32 (auto: fp16 on GPU as the "
                                 "official recipe, fp32 on CPU)", vectors=True)
    chat_format: str | None = _option(None, "override the detected one (template: the checkpoint's own chat template; "
                                            "raw: no chat turn, the prompt as it is)",
                                      vectors=True, choices=CHAT_FORMATS)
    max_batch_tokens: int = _option(16384, "padded tokens per forward pass", engine=True, type=count())
    max_batch_size: int = _option(256, "inputs per forward pass", engine=True, type=count())
    max_length: int | None = _option(None, "token limit per input; longer texts are truncated", vectors=True,
                                     engine=True, type=count())
    num_workers: int = _option(0, "preprocessing worker processes, overlapped with the model (default 0: in the "
                                  "main process)", flag="--workers", engine=True, type=count(0))
    packing: bool | str = _option("auto", "padding-free batches (auto: only under FlashAttention or FlexAttention; "
                                          "same vectors)", engine=True, choices=tuple(PACKING))
    group_lengths: bool = _option(False, "batches of one length only (unmasked SDPA kernels; same vectors)",
                                  engine=True)
    anyres_max_tiles: int | None = _option(None, "speed option, a deviation from the official recipe: at most K "
                                                 "AnyRes grid tiles per image", vectors=True, type=count())
    image_max_pixels: int | None = _option(None, "at most N pixels of image per image (dynamic resolution: "
                                                 "resized; tiling: whole tiles); only lowers the checkpoint's budget",
                                           vectors=True,
                                           type=count())
    attn_implementation: str | None = _option(None, "sdpa, eager, flash_attention_2, flex_attention")
    revision: str | None = None  # hub options: not CLI flags
    local_files_only: bool | None = None
    window: int | None = _option(None, engine=True)  # engine options the CLI leaves at their defaults
    max_pixels: int | None = _option(None, engine=True)
    alpha: str = _option("white", vectors=True, engine=True)  # "official" for the evaluation protocols

    # --- the CLI --------------------------------------------------------------------------------------------
    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
        """The model flags (``--model``, ``--dtype``, ``--workers``, ...), one per CLI field."""
        for f in cls.cli_fields():
            meta = f.metadata
            flag = meta["flag"] or "--" + f.name.replace("_", "-")
            options: dict[str, Any] = {"help": meta["help"], "dest": f.name}
            if f.name == "model":
                options["required"] = model_required
            if f.type in ("bool", bool):
                options["action"] = "store_true"
            else:
                options["default"] = f.default
                options.update(meta["cli"])
                if "choices" not in options:
                    options["metavar"] = flag[2:].replace("-", "_").upper()
            parser.add_argument(flag, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "EngineConfig":
        """The configuration of parsed model flags (``overrides``: options the verb sets itself)."""
        values = {f.name: getattr(args, f.name) for f in cls.cli_fields() if hasattr(args, f.name)}
        if isinstance(values.get("packing"), str):
            values["packing"] = PACKING.get(values["packing"], values["packing"])
        return cls(**values).replace(**overrides)

    # --- what it means -----------------------------------------------------------------------------------
    def replace(self, **changes) -> "EngineConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def engine_options(self) -> dict:
        """The options of the :class:`~e5v.encoder.E5V` constructor (the fields marked ``engine``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("engine")}

    def vector_settings(self) -> dict:
        """The settings that change the vectors, as recorded beside them: checkpoints as absolute paths (hub ids
        as given) with ``weights``, a fingerprint of a local checkpoint's files (so that a record never outlives
        a model re-trained in the same folder), the compute dtype resolved (``auto`` on this machine), and
        ``alpha`` (how transparent images become RGB)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("vectors"):
                out[f.name] = getattr(self, f.name)
        out["model"], out["adapter"] = checkpoint_path(self.model), checkpoint_path(self.adapter)
        out["weights"] = {"model": checkpoint_files(self.model), "adapter": checkpoint_files(self.adapter)}
        out["dtype"] = dtype_name(self.dtype, self.device)
        return out


def checkpoint_path(name: str | None) -> str | None:
    """Local directories absolute (a record works from any folder); hub ids as given."""
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def checkpoint_files(name: str | None) -> str | None:
    """A fingerprint of a local checkpoint's files (relative names, sizes, modification times); None for a hub
    id."""
    if not name or not os.path.isdir(name):
        return None
    root, h = Path(name), hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve_device(device):
    """``None`` or ``"auto"``: the GPU when there is one, else the CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device, *, training: bool = False):
    """The compute dtype: a name, a ``torch.dtype``, or ``auto`` (see the module's docstring)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if training and torch.cuda.is_bf16_supported() else torch.float16
    try:
        return getattr(torch, DTYPE_NAMES[str(dtype)])
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of auto, {', '.join(DTYPE_NAMES)}") from None


def dtype_name(dtype, device=None, *, training: bool = False) -> str:
    """The resolved compute dtype's name (``float16``, ...) for the records."""
    return str(resolve_dtype(dtype, resolve_device(device), training=training)).replace("torch.", "")
