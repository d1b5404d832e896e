"""LLaVA-1.5 (``model_type: llava``), and the processor fixes that LLaVA-NeXT shares.

Fixes that the official E5-V code lacks on current transformers, done here at load time:
- the processor's ``patch_size`` / ``vision_feature_select_strategy`` / CLS count may be missing from
  ``processor_config.json`` (royokong/e5-v's lacks them); they are taken from the model config;
- the ``<image>`` token id may differ from ``config.image_token_id`` and may equal the vocabulary size
  (128256 in royokong/e5-v, one past the embedding matrix): the config is pointed at the
  tokenizer's id and the input embeddings get the missing row (its value is never used: image features
  replace it);
- no torchvision needed: the processor loads with its PIL backend (:class:`~.base.ProcessorBackbone`).
"""
from __future__ import annotations

import logging

import torch

from .. import prompts
from .base import ProcessorBackbone, register

log = logging.getLogger(__name__)


@register
class LlavaBackbone(ProcessorBackbone):
    model_types = ("llava",)
    chat_formats = ("vicuna", "llama3", "mistral")
    reserved_tokens = (prompts.IMAGE,)

    @classmethod
    def detect_chat_format(cls, tokenizer) -> str:
        """E5-V's hand-written format the tokenizer is made for, where the family has it; else its default."""
        vocab = tokenizer.get_vocab()
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        guess = ("llama3" if "<|start_header_id|>" in vocab else
                 "mistral" if "[INST]" in vocab or "[INST]" in template else "vicuna")
        return guess if guess in cls.chat_formats else cls.chat_formats[0]

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        parts = super().load_preprocessing(path, model, **hub_kwargs)
        if model is not None:  # texts only need no image-token fix
            fix_processor_and_model(parts["processor"], model)
        return parts


def fix_processor_and_model(processor, model) -> None:
    """Make processor and model agree on the image token and its count (see the module docstring)."""
    cfg = model.config
    vision = cfg.vision_config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vision.patch_size
        log.info("processor had no patch_size; using the vision tower's %d", vision.patch_size)
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = cfg.vision_feature_select_strategy
    has_cls = hasattr(getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings,
                      "class_embedding")
    if getattr(processor, "num_additional_image_tokens", 0) != int(has_cls):
        processor.num_additional_image_tokens = int(has_cls)

    token = getattr(processor, "image_token", prompts.IMAGE)
    image_id = processor.tokenizer.convert_tokens_to_ids(token)
    if image_id is None or image_id == processor.tokenizer.unk_token_id:
        from ..errors import ModelLoadError

        raise ModelLoadError(f"the tokenizer has no {token!r} token")
    processor.image_token_id = image_id
    if cfg.image_token_id != image_id:
        log.info("config.image_token_id %s -> %s (the tokenizer's %s)", cfg.image_token_id, image_id, token)
        cfg.image_token_id = image_id
    emb = model.get_input_embeddings()
    if image_id >= emb.num_embeddings:
        grow_input_embeddings(model, image_id + 1)


def grow_input_embeddings(model, rows: int) -> None:
    """Give the input embedding matrix ``rows`` rows, leaving lm_head and the vocab size untouched.

    The new rows are zero: only image-token positions use them, and image features overwrite those.
    """
    old = model.get_input_embeddings()
    new = torch.nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx,
                             device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: old.num_embeddings] = old.weight
    new.requires_grad_(old.weight.requires_grad)
    model.set_input_embeddings(new)
    log.info("input embeddings grown from %d to %d rows for the image token", old.num_embeddings, rows)
