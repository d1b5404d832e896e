"""``e5v merge``: fold a LoRA adapter into its base checkpoint and write a full checkpoint.

The output is the base checkpoint with merged language-model weights: the same architecture, config,
tokenizer and processor files (copied as they are, quirks included, so that ``E5V.from_pretrained`` repairs
them exactly as it repairs the base), loadable by ``E5V.from_pretrained`` and by transformers.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def _source_dir(base: str) -> Path:
    if os.path.isdir(base):
        return Path(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, ignore_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]))
    except Exception as exc:  # offline, unknown repo ...
        raise ModelLoadError(f"cannot fetch the files of {base!r}: {exc}") from exc


def merge(base: str, adapter: str, out, *, dtype: str = "auto") -> Path:
    """Write ``base`` + ``adapter`` merged into ``out`` (a new directory); returns ``out``."""
    from transformers import AutoModelForImageTextToText

    from ..adapters import merge_adapter
    from ..config import resolve_dtype

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new output directory")
    # "auto" here is the checkpoint's own dtype (transformers'), not the encoder's device default
    torch_dtype = "auto" if dtype == "auto" else resolve_dtype(dtype, torch.device("cpu"))
    src = _source_dir(base)
    try:
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {base!r}: {exc}") from exc
    merge_adapter(model, adapter)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():  # tokenizer, processor, chat template ... exactly as the base has them
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json") \
                and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    with torch.no_grad():
        model.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("merged %s into %s -> %s", adapter, base, out)
    return out
