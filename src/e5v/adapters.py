"""LoRA adapters: merge a peft adapter directory into a loaded backbone's weights.

Two layouts are accepted: an adapter trained on the whole multimodal model (module names contain
``language_model``), and one trained on the language model alone as a causal LM (names ``model.layers.*``,
the E5-V recipe, which loads only the LLM for text-only training).

Training with images may also train the vision side; those weights lie beside the adapter in
:data:`VISION_FILE`: the projector's weights as they are, and LoRA pairs of the vision tower's linear layers
(``<module>.lora_A.weight`` / ``.lora_B.weight``, scale ``alpha / r`` in the file's metadata), every name as in
the multimodal base model (``model.model``).
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


#: Beside the adapter: the vision weights that training with images trained (module docstring).
VISION_FILE = "vision_weights.safetensors"


#: (vision tower, projectors) module names in the multimodal base models of transformers: LLaVA(-NeXT), Gemma 3 and
#: InternVL; Idefics3 / SmolVLM; Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the tower's blocks, then its merger, and
#: Qwen3-VL's deepstack mergers, which put features of inner blocks into the first LM layers).
VISION_PARTS = (("vision_tower", ("multi_modal_projector",)), ("vision_model", ("connector",)),
                ("visual.blocks", ("visual.merger", "visual.deepstack_merger_list")))


def vision_modules(base: torch.nn.Module) -> tuple[str, tuple[str, ...]]:
    """(vision tower, the projectors it has): their module names in a multimodal base model (``model.model``)."""
    names = {n for n, _ in base.named_modules()}
    for tower, projectors in VISION_PARTS:
        if tower in names and projectors[0] in names:
            return tower, tuple(p for p in projectors if p in names)
    raise ModelLoadError(f"{type(base).__name__}: no known vision tower and projector")


def merge_vision_weights(model: torch.nn.Module, path: Path) -> None:
    """Put the weights of a :data:`VISION_FILE` into ``model`` (the full multimodal model): projector weights
    copied, tower LoRA merged (``W += scale * B @ A``, in fp32)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        scale = float((fh.metadata() or {}).get("lora_scale", "nan"))
        weights = {k: fh.get_tensor(k) for k in fh.keys()}
    base = model.model
    with torch.no_grad():
        for key, value in weights.items():
            if ".lora_A." in key:
                continue
            try:
                if ".lora_B." in key:
                    module = key.split(".lora_B.")[0]
                    target = base.get_submodule(module).weight
                    a = weights[f"{module}.lora_A.weight"]
                    delta = scale * (value.float() @ a.float())
                    if not delta.isfinite().all():
                        raise ModelLoadError(f"{path}: no valid lora_scale in its metadata")
                    target.copy_((target.float() + delta.to(target.device)).to(target.dtype))
                else:
                    target = base.get_parameter(key)
                    target.copy_(value.to(target.device, target.dtype))
            except (AttributeError, KeyError, RuntimeError) as exc:
                raise ModelLoadError(f"{path}: {key} does not fit {type(base).__name__} ({exc})") from None


def merge_adapter(model: torch.nn.Module, adapter_dir) -> None:
    """Merge the LoRA adapter in ``adapter_dir`` into ``model`` in place, and its vision weights if any."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelLoadError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    whole_model = any(".language_model." in k for k in adapter_keys(adapter_dir))
    target = model if whole_model else CausalLMView(model.model.get_decoder())  # language_model / text_model
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.task_type = None  # a plain module wrapper: no generation helpers needed to merge
    config.inference_mode = True
    wrapped = PeftModel(target, config)
    wrapped.load_adapter(str(adapter_dir), adapter_name="default")
    wrapped.merge_and_unload()
    vision = adapter_dir / VISION_FILE
    if vision.exists():
        merge_vision_weights(model, vision)
    log.info("merged adapter %s into the %s%s", adapter_dir, "model" if whole_model else "language model",
             " and its vision weights" if vision.exists() else "")
