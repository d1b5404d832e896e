"""GradCache: a contrastive batch larger than what fits in memory, with the gradients of the plain loss.

The loss couples every embedding of the batch, so the batch cannot simply be split into accumulated
micro-batches. GradCache (Gao et al., 2021) runs it in two passes over micro-batches ("chunks"):

1. forward every chunk without autograd, keep only the embeddings;
2. compute the loss on the embeddings and its gradient with respect to each embedding;
3. forward every chunk again with autograd and back-propagate ``sum(embedding * its cached gradient)``.

Step 3 gives, summed over chunks, exactly the parameter gradient of the loss in step 2. The random state
(LoRA dropout) of each chunk is recorded in pass 1 and replayed in pass 3, so both passes see the same
masks. When the whole local batch fits in one chunk, the plain path runs (one forward, one backward).

Chunks hold at most ``chunk_size`` sequences and ``chunk_tokens`` padded tokens (sequences x the longest; a longer
sequence runs alone), so that the memory of a chunk of images (thousands of tokens each) is bounded as that of a
chunk of texts. They can be formed from sequences sorted by length (``sort_by_length``, the engine's batch
planning): less padding, same result; or be given (``plan``: the official layout's padded groups, see
:mod:`e5v.train.official`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import batching
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


def plan_chunks(lengths: list[int], chunk_size: int, sort_by_length: bool,
                chunk_tokens: int | None = None) -> list[list[int]]:
    """Index lists of the chunks: at most ``chunk_size`` sequences and ``chunk_tokens`` padded tokens each (None: no
    token limit); longest first with ``sort_by_length`` (the engine's :func:`~e5v.batching.plan_batches`), else in
    the given order."""
    size, tokens = max(1, int(chunk_size)), int(chunk_tokens) if chunk_tokens else 1 << 62
    if sort_by_length:
        return batching.plan_batches(lengths, max_tokens=tokens, max_size=size)
    chunks: list[list[int]] = []
    longest = 0
    for k, n in enumerate(lengths):
        if chunks and len(chunks[-1]) < size and (len(chunks[-1]) + 1) * max(longest, n) <= tokens:
            chunks[-1].append(k)
            longest = max(longest, n)
        else:
            chunks.append([k])
            longest = n
    return chunks


def contrastive_step(encode: Encode, anchors: list, positives: list, negatives: list, *, temperature: float = 0.05,
                     chunk_size: int = 72, sort_by_length: bool = True, chunk_tokens: int | None = None,
                     device: torch.device = CPU, backward: Callable[[torch.Tensor, bool], None] | None = None,
                     plan: list[list[int]] | None = None, filler: list | None = None,
                     min_chunks: int = 0) -> StepResult:
    """Forward and backward of the InfoNCE loss for this process's shard of the global batch.

    ``encode(chunk of sequences) -> (n, d)`` embeds one chunk (sequences: anything with a length in tokens);
    gradients accumulate in the parameters (sum them over processes afterwards). ``backward(tensor, last)``
    back-propagates one chunk's tensor (``last``: the step's final backward): a parallel strategy's hook (loss
    scaling, DeepSpeed's engine, FSDP's gradient sync); default ``tensor.backward()``. ``plan``: the chunks as
    index lists into ``anchors + positives + negatives`` (default: :func:`plan_chunks` with ``chunk_size``,
    ``sort_by_length`` and ``chunk_tokens``).
    ``filler``: a chunk to run with weight 0 when this process has fewer chunks than ``min_chunks`` (an empty
    shard: a last batch shorter than the process count, or rows left out), so that it takes part in every
    collective exactly as the others do. ``min_chunks``: the most chunks any process runs in this step, for
    strategies whose forward and backward passes are collectives (ZeRO-3, FSDP); above 1, every process runs the
    two GradCache passes over that many chunks.
    """
    backward = backward or (lambda t, last: t.backward())
    seqs = anchors + positives + negatives
    na, npos = len(anchors), len(positives)
    chunks: list = plan if plan is not None else plan_chunks([len(s) for s in seqs], chunk_size, sort_by_length,
                                                             chunk_tokens)
    padded = sum(len(c) * max(len(seqs[k]) for k in c) for c in chunks)
    fill = max(int(min_chunks), 1 if not chunks else 0) - len(chunks)
    if fill > 0 and not filler:
        raise ValueError("an empty shard, or fewer chunks than min_chunks, needs a filler chunk")
    chunks = list(chunks) + [None] * max(0, fill)  # None: the filler, weight 0

    def split(reps: torch.Tensor):
        return reps[:na], reps[na:na + npos], reps[na + npos:]

    def run(c):
        return encode(filler if c is None else [seqs[k] for k in c])

    if len(chunks) == 1:  # plain path: the local batch fits in one forward pass
        order = chunks[0]
        emb = run(order)
        if order is None:
            none = emb.detach()[:0]
            loss, cands = global_info_nce(none, none, none, temperature=temperature)
            backward((emb * 0).sum(), True)  # zero gradients, but the strategy's hooks and reductions run
            return StepResult(float(loss.detach()), cands, 0, 0, 0)
        reps = torch.empty_like(emb).index_copy(0, torch.as_tensor(order, device=emb.device), emb)
        loss, cands = global_info_nce(*split(reps), temperature=temperature)
        backward(loss, True)
        return StepResult(float(loss.detach()), cands, len(seqs), padded, 1)

    states, parts = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(_rng_state(device))
            emb = run(c).float()
            if c is not None:
                parts.append(emb)
    width = emb.shape[1]
    real = [c for c in chunks if c is not None]
    reps = torch.empty((len(seqs), width), device=emb.device)
    if real:
        reps.index_copy_(0, torch.as_tensor([k for c in real for k in c], device=emb.device), torch.cat(parts))
    reps.requires_grad_(True)
    loss, cands = global_info_nce(*split(reps), temperature=temperature)
    if seqs:
        loss.backward()
    cached = reps.grad
    after = _rng_state(device)
    for i, (c, state) in enumerate(zip(chunks, states)):
        _set_rng_state(state, device)
        emb = run(c).float()
        g = emb.new_zeros(()) if c is None else cached.index_select(0, torch.as_tensor(c, device=cached.device))
        backward((emb * g).sum(), i == len(chunks) - 1)
    _set_rng_state(after, device)
    return StepResult(float(loss.detach()), cands, len(seqs), padded, len(real))
