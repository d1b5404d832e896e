"""The model side of training: the language model of a multimodal checkpoint, with LoRA.

E5-V trains the LLM alone: the vision tower and projector are not loaded (the checkpoint's other weights are
never read), unless ``load_vision=True`` asks for the whole multimodal model (data with images does). The
adapter is saved in the layout of a causal LM (``base_model.model.model.layers.*``, the official layout), which
:func:`e5v.adapters.merge_adapter` and ``E5V.from_pretrained(..., adapter=DIR)`` accept. The vision side is
frozen, unless ``train_projector`` (the projector's own weights) or ``vision_lora`` (LoRA on the tower's linear
layers) train it; those weights go to :data:`e5v.adapters.VISION_FILE` beside the adapter.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..adapters import CausalLMView, vision_modules
from ..backbones import load_config
from ..errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

#: Keys of a multimodal checkpoint's language model, in the layouts transformers writes (v4 llava-hf and v5).
LM_KEY_MAPPING = {r"^language_model\.model\.": "", r"^model\.language_model\.": "", r"^model\.text_model\.": ""}


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def wants_4bit(option, device: torch.device, images: bool = False) -> bool:
    """``load_in_4bit``: True, False or "auto" (QLoRA when bitsandbytes and a GPU are present). Data with images
    trains unquantised: 4-bit would quantise the vision tower and projector too ("auto": plain LoRA then)."""
    if images and option in (True, "true", "yes", "1"):
        raise ConfigError("4-bit QLoRA is for text-only data: it would quantise the vision tower and projector "
                          "too; train data with images with --load-in-4bit false")
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
    return device.type == "cuda" and has_bitsandbytes() and not images


def load_language_model(path: str, *, dtype: torch.dtype, device: torch.device, load_in_4bit=False,
                        load_vision: bool = False, attn_implementation: str | None = None, **hub):
    """(base language model without lm_head, config of the checkpoint, the whole multimodal model or None).
    The tokenizer is the backbone's (:meth:`e5v.backbones.Backbone.for_text`). Every weight is frozen until
    :func:`add_lora`. The whole model's lm_head is dropped (replaced by an identity): training pools hidden
    states, and sharded runs would carry it unsharded."""
    from transformers import AutoModel, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    try:
        config = load_config(path, **hub)
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
    full = None
    if load_vision and multimodal:
        model = full = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
        if isinstance(getattr(full, "lm_head", None), torch.nn.Module):
            full.lm_head = torch.nn.Identity()  # tied to the embeddings or not: the embeddings stay
        lm = model.model.get_decoder()  # language_model, or Idefics3's text_model
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
    model.requires_grad_(False)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    log.info("loaded the %s of %s (%s, %s%s)", "whole model" if full is not None else "language model", path,
             type(lm).__name__, dtype, ", 4-bit NF4" if load_in_4bit else "")
    return lm, config, full


@dataclass
class LoraModel:
    """The trainable model: the peft wrapper of the LM (what is saved as the adapter), the base LM, and for
    data with images the multimodal base model (``mm``) with its trainable vision weights (``vision``, by name
    in ``mm``)."""

    peft: torch.nn.Module
    lm: torch.nn.Module
    mm: torch.nn.Module | None = None
    vision: tuple[str, ...] = ()  # names in ``mm`` (looked up each time: FSDP replaces the parameters)
    vision_scale: float = 1.0  # LoRA scale (alpha / r) of the tower's LoRA

    @property
    def runner(self) -> torch.nn.Module:
        """What the encoder runs: the LM, or the multimodal base model."""
        return self.mm if self.mm is not None else self.lm

    @property
    def root(self) -> torch.nn.Module:
        """The module that holds every trainable parameter (what DeepSpeed wraps)."""
        return self.mm if self.mm is not None else self.peft

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.named_trainable().values())

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """The LM's LoRA weights by their peft names, then the vision weights by their names in ``mm``."""
        lm = {n: p for n, p in self.peft.named_parameters() if p.requires_grad}
        return {**lm, **{n: self.mm.get_parameter(n) for n in self.vision}} if self.vision else lm

    def split(self, weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """(the LM adapter's weights, the vision file's: peft's ``.default`` adapter name dropped)."""
        vision = {vision_key(n): weights[n] for n in self.vision}
        return {n: w for n, w in weights.items() if n not in self.vision}, vision

    def load_vision(self, weights: dict[str, torch.Tensor]) -> None:
        """Put a vision file's weights (see :meth:`split`) into the trainable vision parameters."""
        want = {vision_key(n): self.mm.get_parameter(n) for n in self.vision}
        if set(weights) != set(want):
            raise ConfigError(f"vision weights do not fit the model: {sorted(set(weights) ^ set(want))[:3]}")
        with torch.no_grad():
            for k, w in weights.items():
                want[k].copy_(w)


def vision_key(name: str) -> str:
    """A vision parameter's name in the vision file (peft's adapter name ``default`` dropped)."""
    return name.replace(".default.", ".")


def set_checkpointing(lm, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, non-reentrant; transformers 5.24 renamed the methods."""
    new = hasattr(lm, "activation_checkpointing_enable")
    if on and new:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (lm.activation_checkpointing_disable if new else lm.gradient_checkpointing_disable)()


def tower_blocks(tower: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(name in ``tower``, the blocks): the vision tower's transformer blocks, its first module list."""
    return next((n, m) for n, m in tower.named_modules() if isinstance(m, torch.nn.ModuleList))


def used_tower_linears(tower: torch.nn.Module, config) -> list[str]:
    """The linear layers of the tower's blocks whose output the model uses: LLaVA takes the features of layer
    ``vision_feature_layer`` (-2 in LLaVA-NeXT: the last block is never run into the LM), Qwen all blocks."""
    name, blocks = tower_blocks(tower)
    used = len(blocks)
    feature = getattr(config, "vision_feature_layer", None)
    if feature is not None:  # hidden state k is the output of the first k blocks (0: the embeddings)
        used = max(k if k >= 0 else len(blocks) + 1 + k for k in ([feature] if isinstance(feature, int) else feature))
    prefixes = tuple(f"{name}.{i}." if name else f"{i}." for i in range(used))
    return [n for n, m in tower.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefixes)]


def add_lora(lm, *, r: int = 64, alpha: int = 16, dropout: float = 0.05,
             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             gradient_checkpointing: bool = True, full=None, train_projector: bool = False,
             vision_lora: bool = False) -> LoraModel:
    """LoRA on the language model's linear layers named in ``targets`` (E5-V: all seven of every layer).

    ``full``: the whole multimodal model (data with images): the encoder runs its base model; the projectors'
    weights train with ``train_projector``, LoRA (same r, alpha, dropout) on every linear layer of the vision
    tower with ``vision_lora``; the rest stays frozen. Trainable weights are fp32 (peft keeps the LM's LoRA in
    fp32; the vision ones are cast to it) under a bf16/fp16 base run with autocast, as fp16 loss scaling needs."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    if gradient_checkpointing:
        set_checkpointing(lm, True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=list(targets))
    peft = get_peft_model(CausalLMView(lm), config)
    found = sum(1 for n, _ in peft.named_modules() if n.endswith("lora_A"))
    if not found:
        raise ConfigError(f"no LoRA target matched {list(targets)} in {type(lm).__name__}")
    model = LoraModel(peft, lm, mm=full.model if full is not None else None, vision_scale=alpha / r)
    if full is not None and (train_projector or vision_lora):
        tower_name, projectors = vision_modules(model.mm)
        vision = []
        if vision_lora:
            tower = model.mm.get_submodule(tower_name)
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                               target_modules=used_tower_linears(tower, model.mm.config)), tower)
            vision += [f"{tower_name}.{n}" for n, _ in tower.named_parameters() if "lora_" in n]
            tower.train()  # LoRA dropout (the frozen tower has none of its own: CLIP's and Qwen's are 0)
        if train_projector:
            vision += [f"{name}.{n}" for name in projectors for n, _ in model.mm.get_submodule(name).named_parameters()]
        model.vision = tuple(vision)
        for p in model.trainable:
            p.data = p.data.float()
            p.requires_grad_(True)
    elif train_projector or vision_lora:
        raise ConfigError("train_projector and vision_lora train the vision side: they need data with images")
    peft.train()
    log.info("LoRA r=%d alpha=%d dropout=%s on %d modules%s: %d trainable parameters", r, alpha, dropout, found,
             (" + vision tower LoRA" if vision_lora else "") + (" + projector" if train_projector else ""),
             sum(p.numel() for p in model.trainable))
    return model
