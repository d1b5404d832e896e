"""The model side of training: the language model of a multimodal checkpoint, with LoRA.

E5-V trains the LLM alone: the vision tower and projector are not loaded (the checkpoint's other weights are
never read), unless ``load_vision=True`` asks for the whole multimodal model. The adapter is saved in the
layout of a causal LM (``base_model.model.model.layers.*``, the official layout), which
:func:`e5v.adapters.merge_adapter` and ``E5V.from_pretrained(..., adapter=DIR)`` accept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..adapters import CausalLMView
from ..errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

#: Keys of a multimodal checkpoint's language model, in the layouts transformers writes (v4 llava-hf and v5).
LM_KEY_MAPPING = {r"^language_model\.model\.": "", r"^model\.language_model\.": ""}


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def wants_4bit(option, device: torch.device) -> bool:
    """``load_in_4bit``: True, False or "auto" (QLoRA when bitsandbytes and a GPU are present)."""
    if option in (True, "true", "yes", "1"):
        if device.type != "cuda":
            raise ConfigError("4-bit QLoRA needs a CUDA GPU")
        if not has_bitsandbytes():
            raise ConfigError("4-bit QLoRA needs bitsandbytes: pip install bitsandbytes")
        return True
    if option in (False, "false", "no", "0"):
        return False
    if option != "auto":
        raise ConfigError(f"load_in_4bit must be true, false or auto, not {option!r}")
    return device.type == "cuda" and has_bitsandbytes()


def load_language_model(path: str, *, dtype: torch.dtype, device: torch.device, load_in_4bit=False,
                        load_vision: bool = False, attn_implementation: str | None = None, **hub):
    """(base language model without lm_head, config of the checkpoint). The tokenizer is the backbone's
    (:meth:`e5v.backbones.Backbone.for_text`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(path, **hub)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the config of {path!r}: {exc}") from exc
    kwargs: dict = dict(dtype=dtype, **hub)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if device.type != "cpu":
        kwargs["device_map"] = str(device)
    multimodal = getattr(config, "text_config", None) is not None
    if load_vision and multimodal:
        model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
        lm = model.model.language_model
    else:
        text_config = config.text_config if multimodal else config
        if multimodal:
            kwargs["key_mapping"] = LM_KEY_MAPPING
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the skipped vision weights are reported as "unexpected": by design
        try:
            lm, info = AutoModel.from_pretrained(path, config=text_config, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        if info.get("missing_keys"):
            raise ModelLoadError(f"{path}: language-model weights missing from the checkpoint: "
                                 f"{sorted(info['missing_keys'])[:5]}")
        model = lm
    lm.config.use_cache = False
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    log.info("loaded the language model of %s (%s, %s%s)", path, type(lm).__name__, dtype,
             ", 4-bit NF4" if load_in_4bit else "")
    return lm, config


@dataclass
class LoraModel:
    """The trainable model: the peft wrapper (what is saved) and the base LM the encoder runs."""

    peft: torch.nn.Module
    lm: torch.nn.Module

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.peft.named_parameters() if p.requires_grad}


def set_checkpointing(lm, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, non-reentrant; transformers 5.24 renamed the methods."""
    new = hasattr(lm, "activation_checkpointing_enable")
    if on and new:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (lm.activation_checkpointing_disable if new else lm.gradient_checkpointing_disable)()


def add_lora(lm, *, r: int = 64, alpha: int = 16, dropout: float = 0.05,
             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             gradient_checkpointing: bool = True) -> LoraModel:
    """LoRA on the language model's linear layers named in ``targets`` (E5-V: all seven of every layer)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        set_checkpointing(lm, True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=list(targets))
    peft = get_peft_model(CausalLMView(lm), config)
    found = sum(1 for n, _ in peft.named_modules() if n.endswith("lora_A"))
    if not found:
        raise ConfigError(f"no LoRA target matched {list(targets)} in {type(lm).__name__}")
    peft.train()
    model = LoraModel(peft, lm)
    log.info("LoRA r=%d alpha=%d dropout=%s on %d modules: %d trainable parameters", r, alpha, dropout, found,
             sum(p.numel() for p in model.trainable))
    return model
