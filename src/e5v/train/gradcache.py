"""GradCache: a contrastive batch larger than what fits in memory, with the gradients of the plain loss.

The loss couples every embedding of the batch, so the batch cannot simply be split into accumulated
micro-batches. GradCache (Gao et al., 2021) runs it in two passes over micro-batches ("chunks"):

1. forward every chunk without autograd, keep only the embeddings;
2. compute the loss on the embeddings and its gradient with respect to each embedding;
3. forward every chunk again with autograd and back-propagate ``sum(embedding * its cached gradient)``.

Step 3 gives, summed over chunks, exactly the parameter gradient of the loss in step 2. The random state
(LoRA dropout) of each chunk is recorded in pass 1 and replayed in pass 3, so both passes see the same
masks. When the whole local batch fits in one chunk, the plain path runs (one forward, one backward).

Chunks can be formed from sequences sorted by length (``sort_by_length``): less padding, same result; or be given
(``plan``: the official layout's padded groups, see :mod:`e5v.train.official`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .loss import global_info_nce

Encode = Callable[[list], torch.Tensor]  # a chunk of prepared sequences -> their embeddings (n, d)
CPU = torch.device("cpu")


@dataclass
class StepResult:
    loss: float
    candidates: int          # candidates each anchor is scored against (global positives + hard negatives)
    sequences: int           # sequences embedded by this process
    padded_tokens: int       # tokens run through the model by this process, padding included
    chunks: int


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def plan_chunks(lengths: list[int], chunk_size: int, sort_by_length: bool) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k]) if sort_by_length else list(range(len(lengths)))
    return [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)]


def contrastive_step(encode: Encode, anchors: list, positives: list, negatives: list, *, temperature: float = 0.05,
                     chunk_size: int = 72, sort_by_length: bool = True, device: torch.device = CPU,
                     backward: Callable[[torch.Tensor, bool], None] | None = None,
                     plan: list[list[int]] | None = None, filler: list | None = None) -> StepResult:
    """Forward and backward of the InfoNCE loss for this process's shard of the global batch.

    ``encode(chunk of sequences) -> (n, d)`` embeds one chunk (sequences: anything with a length in tokens);
    gradients accumulate in the parameters (sum them over processes afterwards). ``backward(tensor, last)``
    back-propagates one chunk's tensor (``last``: the step's final backward): a parallel strategy's hook (loss
    scaling, DeepSpeed's engine, FSDP's gradient sync); default ``tensor.backward()``. ``plan``: the chunks as
    index lists into ``anchors + positives + negatives`` (default: ``chunk_size`` sequences, sorted by length).
    ``filler``: a chunk to run with weight 0 when this process's shard is empty (a last batch shorter than the
    process count), so that it takes part in every collective exactly as the others do.
    """
    backward = backward or (lambda t, last: t.backward())
    seqs = anchors + positives + negatives
    if not seqs:
        if not filler:
            raise ValueError("an empty shard needs a filler chunk")
        emb = encode(filler)
        none = emb.detach()[:0]
        loss, cands = global_info_nce(none, none, none, temperature=temperature)
        backward((emb * 0).sum(), True)  # zero gradients, but the strategy's hooks and reductions run
        return StepResult(float(loss.detach()), cands, 0, 0, 0)
    na, npos = len(anchors), len(positives)
    chunks = plan if plan is not None else plan_chunks([len(s) for s in seqs], max(1, int(chunk_size)),
                                                       sort_by_length)
    padded = sum(len(c) * max(len(seqs[k]) for k in c) for c in chunks)

    def split(reps: torch.Tensor):
        return reps[:na], reps[na:na + npos], reps[na + npos:]

    if len(chunks) == 1:  # plain path: the local batch fits in one forward pass
        order = chunks[0]
        emb = encode([seqs[k] for k in order])
        reps = torch.empty_like(emb).index_copy(0, torch.as_tensor(order, device=emb.device), emb)
        loss, cands = global_info_nce(*split(reps), temperature=temperature)
        backward(loss, True)
        return StepResult(float(loss.detach()), cands, len(seqs), padded, 1)

    states, parts = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(_rng_state(device))
            parts.append(encode([seqs[k] for k in c]).float())
    index = torch.as_tensor([k for c in chunks for k in c], device=parts[0].device)
    reps = torch.empty((len(seqs), parts[0].shape[1]), device=parts[0].device)
    reps.index_copy_(0, index, torch.cat(parts))
    reps.requires_grad_(True)
    loss, cands = global_info_nce(*split(reps), temperature=temperature)
    loss.backward()
    cached = reps.grad
    after = _rng_state(device)
    for i, (c, state) in enumerate(zip(chunks, states)):
        _set_rng_state(state, device)
        emb = encode([seqs[k] for k in c]).float()
        g = cached.index_select(0, torch.as_tensor(c, device=cached.device))
        backward((emb * g).sum(), i == len(chunks) - 1)
    _set_rng_state(after, device)
    return StepResult(float(loss.detach()), cands, len(seqs), padded, len(chunks))
