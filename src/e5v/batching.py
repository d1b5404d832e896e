"""Batches: which prepared items run together (:func:`plan_batches`), whether a batch is padded or packed
(:func:`use_packing`), and the forward pass of one batch (:func:`forward`: collate, move, run the base model, pool
the last position, L2-normalise)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone, Features
from .errors import ConfigError

#: Attention implementations with a variable-length kernel: packing removes padding at no extra attention cost.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def use_packing(packing: bool | str, backbone: Backbone) -> bool:
    """Whether batches are packed: ``"auto"`` packs when the backbone's language model runs a variable-length
    kernel; ``True`` where the backbone cannot pack is a :class:`ConfigError`."""
    if packing == "auto":
        return backbone.supports_packing and backbone.attn_implementation in VARLEN_ATTENTION
    if packing and not backbone.supports_packing:
        raise ConfigError(f"packing is not supported for {type(backbone).__name__}; use packing=False")
    return bool(packing)


def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_size: int, group_lengths: bool = False,
                 packed: bool = False) -> list[list[int]]:
    """Positions grouped into batches: longest first, each under the token budget ``max_tokens`` (padded size, or
    the sum of the lengths when ``packed``) and of at most ``max_size`` items, of one length each with
    ``group_lengths`` (padded batches)."""
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    batches, cur, total = [], [], 0
    for k in order:
        size = total + lengths[k] if packed else (len(cur) + 1) * (lengths[cur[0]] if cur else lengths[k])
        new_length = group_lengths and not packed and cur and lengths[k] != lengths[cur[0]]
        if cur and (size > max_tokens or len(cur) >= max_size or new_length):
            batches.append(cur)
            cur, total = [], 0
        cur.append(k)
        total += lengths[k]
    if cur:
        batches.append(cur)
    return batches


def pool_last(hidden: torch.Tensor) -> torch.Tensor:
    """E5-V pooling: the last position of the final layer (the last real token under left padding)."""
    return hidden[:, -1]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch; to a GPU through pinned host memory with asynchronous copies (the forward pass
    that follows is queued on the same stream, so it sees the data)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def forward(backbone: Backbone, feats: list[Features], *, packed: bool = False, normalize: bool = True) -> np.ndarray:
    """One forward pass: collate (padded, or packed in one row), run the base model, pool each sequence's
    last position, L2-normalise in fp32."""
    if packed:
        cpu_batch, ends = backbone.collate_packed(feats)
    else:
        cpu_batch, ends = backbone.collate(feats), None
    batch = to_device(cpu_batch, backbone.device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(backbone.dtype)
    hidden = backbone.forward(batch)
    emb = (hidden[0, ends.to(hidden.device)] if packed else pool_last(hidden)).float()
    return (F.normalize(emb, dim=-1) if normalize else emb).cpu().numpy()
