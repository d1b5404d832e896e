"""LoRA adapters: merge a peft adapter directory into a loaded backbone's weights.

Two layouts are accepted: an adapter trained on the whole multimodal model (module names contain
``language_model``), and one trained on the language model alone as a causal LM (names ``model.layers.*``,
the E5-V recipe, which loads only the LLM for text-only training).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)


class CausalLMView(torch.nn.Module):
    """Gives a multimodal model's language model the module path a causal LM has (``model.layers...``)."""

    def __init__(self, language_model: torch.nn.Module):
        super().__init__()
        self.model = language_model


def adapter_keys(adapter_dir: Path) -> list[str]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as fh:
            return list(fh.keys())
    bin_ = adapter_dir / "adapter_model.bin"
    if bin_.exists():
        return list(torch.load(bin_, map_location="cpu", weights_only=True))
    raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def merge_adapter(model: torch.nn.Module, adapter_dir) -> None:
    """Merge the LoRA adapter in ``adapter_dir`` into ``model`` in place."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelLoadError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    whole_model = any(".language_model." in k for k in adapter_keys(adapter_dir))
    target = model if whole_model else CausalLMView(model.model.language_model)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type = None  # a plain module wrapper: no generation helpers needed to merge
    config.inference_mode = True
    wrapped = PeftModel(target, config)
    wrapped.load_adapter(str(adapter_dir), adapter_name="default")
    wrapped.merge_and_unload()
    log.info("merged adapter %s into the %s", adapter_dir, "model" if whole_model else "language model")
