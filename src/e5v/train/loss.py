"""The E5-V contrastive loss (InfoNCE) over the global batch.

Each anchor is scored (cosine / tau) against every positive and every hard negative of the global batch; the
target is its own positive. With several processes, each one all-gathers the embeddings, puts its own shard
back with its gradient, and computes the loss over *all* anchors; the gradients of the processes are then
summed (:func:`all_reduce_grads`), which gives exactly the gradient of the one-process loss over the same batch.
(The official code averages them instead, i.e. it trains with the gradient divided by the number of GPUs.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every process along dim 0 (shards may differ in length); the local shard keeps
    its autograd history, the others are constants."""
    rank, size = world()
    if size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    padded = x.detach().new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(parts, padded.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts)


def all_reduce_grads(params) -> None:
    """Sum the gradients of all processes (see the module docstring for why a sum, not a mean)."""
    if world()[1] == 1:
        return
    params = list(params)
    for p in params:  # a parameter this process's chunks did not reach (a tower without images here): zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.05) -> torch.Tensor:
    """Mean over anchors of cross-entropy(cos(a_i, [P; N]) / tau, i). Rows need not be normalised; the cosine
    is taken in fp32. ``negatives`` may hold fewer rows than the anchors (pairs without a hard negative)."""
    cands = positives if negatives is None or negatives.shape[0] == 0 else torch.cat([positives, negatives])
    a = F.normalize(anchors.float(), dim=-1)
    c = F.normalize(cands.float(), dim=-1)
    logits = a @ c.T / temperature
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def global_info_nce(anchors, positives, negatives, temperature: float = 0.05) -> tuple[torch.Tensor, int]:
    """:func:`info_nce` over the embeddings of all processes; returns (loss, candidates per anchor).
    ``negatives`` is a tensor on every process (zero rows where a shard has no hard negative)."""
    a, p, n = gather_with_grad(anchors), gather_with_grad(positives), gather_with_grad(negatives)
    return info_nce(a, p, n, temperature), p.shape[0] + n.shape[0]
