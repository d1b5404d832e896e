"""An MTEB / MIEB encoder backed by the E5V engine, so that any e5v model runs MTEB's and MIEB's tasks.

    import mteb
    from e5v.eval.mteb import E5VMTEB
    model = E5VMTEB("royokong/e5-v", device="cuda")                 # or E5VMTEB(an_E5V_instance)
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark", "Flickr30kT2IRetrieval"]))

It follows mteb's ``EncoderProtocol``: ``encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None,
**kwargs)``, where ``inputs`` is a DataLoader of dict batches holding ``text`` (a list of str), ``image`` (a list
of PIL images) or both (composed queries).  Texts take the E5-V text prompt, images the image prompt, and
image + text the official CIRR query prompt (all from :mod:`e5v.prompts`; each can be overridden).  Vectors
are L2-normalised and scored by cosine.  ``mteb`` is imported only by :attr:`E5VMTEB.mteb_model_meta`.

Why MTEB/MIEB numbers are not comparable with the paper's:

- other galleries: MTEB's COCO (M-BEIR ``mscoco_task0``) has 24,809 de-duplicated captions, not the first 5
  captions of each of the 5,000 Karpathy test images; its CIRR and FashionIQ tasks (M-BEIR task 7) search
  pooled galleries of 21,551 and 74,381 images with every FashionIQ category mixed, where the paper searches
  the CIRR split gallery (reference excluded) and each FashionIQ category's val images;
- another metric: retrieval tasks report nDCG@10 as the main score, the paper Recall@K;
- another SICK-R split: MTEB's ``SICK-R`` "test" is all 9,927 SICK pairs, the paper the 4,927 test pairs;
- another prompt: STS runs with the retrieval text prompt here (the paper's STS prompt is
  ``prompts.STS``); mteb's own E5-V wrapper composes with
  ``[INST] <image> Modify this image with "{}" Describe modified image in one word: [/INST]``, which is not the
  official CIRR prompt used here, and no FashionIQ-specific prompt is applied;
- no caption-order sum for FashionIQ, and STS12-16 scored per subset rather than SentEval's "all" aggregation.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .. import prompts
from ..encoder import E5V
from ..items import Item

log = logging.getLogger(__name__)


class E5VMTEB:
    """mteb ``EncoderProtocol`` implementation over :class:`e5v.encoder.E5V`."""

    def __init__(self, model_name: str | E5V, revision: str | None = None, *, device: str | None = None,
                 dtype: str = "auto", adapter: str | None = None, text_prompt: str = prompts.TEXT,
                 image_prompt: str = prompts.IMAGE_PROMPT, composed_prompt: str = prompts.CIRR_QUERY,
                 chunk_size: int = 256, **engine_options: Any):
        """``model_name``: hub id, local checkpoint directory or a loaded :class:`E5V`; ``device``, ``dtype``,
        ``adapter`` and ``engine_options`` are fields of :class:`~e5v.config.EngineConfig`.  ``chunk_size``: items
        gathered from the DataLoader before each call of the engine (which sorts them by length)."""
        if isinstance(model_name, E5V):
            self.model, self.name = model_name, getattr(model_name.backbone, "path", "") or "e5v"
        else:
            self.model = E5V.from_pretrained(model_name, revision=revision, device=device, dtype=dtype, adapter=adapter,
                                             **engine_options)
            self.name = model_name
        self.revision = revision
        self.prompts = {"text": text_prompt, "image": image_prompt, "composed": composed_prompt}
        self.chunk_size = int(chunk_size)

    # --- mteb EncoderProtocol ----------------------------------------------------------------------------
    def encode(self, inputs, *, task_metadata=None, hf_split: str | None = None, hf_subset: str | None = None,
               prompt_type=None, **kwargs) -> np.ndarray:
        """Vectors (n, d) float32 of every item of every batch, in order.  Raises
        :class:`e5v.errors.BatchInputError` naming each item that cannot be embedded."""
        pending: list[Item] = []
        out: list[np.ndarray] = []
        seen = 0
        for batch in inputs:
            items = self._items(batch, seen)
            seen += len(items)
            pending += items
            if len(pending) >= self.chunk_size:
                out.append(self._embed(pending))
                pending = []
        if pending:
            out.append(self._embed(pending))
        return np.concatenate(out) if out else np.zeros((0, self.model.dim), np.float32)

    def similarity(self, embeddings1, embeddings2):
        """Cosine matrix (n1, n2) as a torch tensor, as the protocol asks (a 1x1 result converts to float)."""
        import torch

        return torch.from_numpy(_unit(embeddings1) @ _unit(embeddings2).T)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Cosine of each row pair (n,) as a torch tensor."""
        import torch

        return torch.from_numpy(np.einsum("ij,ij->i", _unit(embeddings1), _unit(embeddings2)))

    @property
    def mteb_model_meta(self):
        """An ``mteb.ModelMeta`` describing this model (needs the ``mteb`` package)."""
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        return ModelMeta.create_empty(dict(
            name=self.name if "/" in self.name else f"e5v/{self.name.strip('/').split('/')[-1] or 'model'}",
            revision=self.revision or "local", modalities=["image", "text"], embed_dim=self.model.dim,
            similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch", "Transformers"],
            reference="https://arxiv.org/abs/2407.12580", use_instructions=False))

    # --- internals ---------------------------------------------------------------------------------------
    @staticmethod
    def _items(batch: dict, start: int) -> list[Item]:
        texts, images = batch.get("text"), batch.get("image")
        n = len(texts) if texts is not None else len(images) if images is not None else 0
        if n == 0:
            raise ValueError(f"an mteb batch without 'text' or 'image': keys {sorted(batch)}")
        items = []
        for k in range(n):
            t = texts[k] if texts is not None else None
            im = images[k] if images is not None else None
            keep_text = im is None or (isinstance(t, str) and t != "")  # an empty text beside an image: image only
            items.append(Item(text=t if keep_text else None, image=im, name=f"mteb input {start + k}"))
        return items

    def _embed(self, items: list[Item]) -> np.ndarray:
        """Group by modality (one prompt each), embed, and put the rows back in order."""
        kind = ["composed" if it.text is not None and it.image is not None else "image" if it.image is not None
                else "text" for it in items]
        out = np.zeros((len(items), self.model.dim), np.float32)
        for k in ("text", "image", "composed"):
            idx = [i for i, kk in enumerate(kind) if kk == k]
            if idx:
                out[idx] = self.model.encode([items[i] for i in idx], prompt=self.prompts[k])
        return out


def _unit(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
