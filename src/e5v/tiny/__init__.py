"""Tiny random checkpoints of every supported backbone family, built offline in a fraction of a second.

They are saved with ``save_pretrained`` and so load back through ``from_pretrained`` exactly like a real
checkpoint directory: the test suite, the CI smoke test of ``e5v embed`` and offline users all get the real
loading code path without a hub download. The weights are random, so the embeddings mean nothing.

Every family shares one byte-level BPE tokenizer recipe (no text yields UNK) and differs only in its special
tokens, its chat template and its model config. Chat templates take ``content`` as a string or as a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts and never write BOS: the tokenizer adds it.

CLI: ``python -m e5v.tiny FAMILY OUT_DIR [--seed N]``. Shared pieces: :mod:`e5v.tiny.common`; one module per
family group builds its checkpoints (``FAMILIES`` and ``build(family, out)``).
"""
from __future__ import annotations

import argparse
import logging
import pathlib

from . import gemma, idefics, llava, qwen, qwen3ov
from .common import LLAMA3_STYLE, MISTRAL_STYLE, QWEN_STYLE, VICUNA_STYLE, TokenizerStyle, build_tokenizer

logger = logging.getLogger(__name__)

#: family -> the module that builds it (one module per backbone family; adding one is one line here)
BUILDERS = {family: module.build for module in (llava, qwen, gemma, idefics, qwen3ov) for family in module.FAMILIES}
FAMILIES = tuple(BUILDERS)


def build_tiny_checkpoint(family: str, out_dir, *, seed: int = 0) -> pathlib.Path:
    """Build a tiny random checkpoint of ``family`` into ``out_dir`` and return its path.

    Same seed, same bit-identical weights and tokenizer files. Families (each module's docstring says what is real
    and what is scaled down):

    - :mod:`~e5v.tiny.llava`: ``llava-next-llama3`` / ``-mistral`` / ``-vicuna``, ``llava-1.5``, and ``e5v-like``
      (the llava-next-llama3 build with royokong/e5-v's quirks, which a loader must repair: the ``<image>`` id one
      past the embedding matrix, a wrong in-range ``config.image_token_index``, no ``patch_size`` in
      ``processor_config.json``);
    - :mod:`~e5v.tiny.qwen`: ``qwen2-vl``, ``qwen2.5-vl``; :mod:`~e5v.tiny.qwen3ov`: ``qwen3-vl``,
      ``llava-onevision``; :mod:`~e5v.tiny.idefics`: ``idefics3``, ``smolvlm``; :mod:`~e5v.tiny.gemma`:
      ``gemma3``, ``internvl``.
    """
    import torch
    from transformers.utils import logging as hf_logging

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard-writing bar per tiny file is noise
    try:
        torch.manual_seed(seed)
        BUILDERS[family](family, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    logger.info("built tiny %s checkpoint (seed %d) in %s", family, seed, out)
    return out


def main(argv=None) -> None:
    """``python -m e5v.tiny FAMILY OUT_DIR``: write a tiny checkpoint and print its directory."""
    parser = argparse.ArgumentParser(prog="python -m e5v.tiny", description=main.__doc__)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_checkpoint(args.family, args.out_dir, seed=args.seed))


__all__ = ["BUILDERS", "FAMILIES", "LLAMA3_STYLE", "MISTRAL_STYLE", "QWEN_STYLE", "VICUNA_STYLE", "TokenizerStyle",
           "build_tiny_checkpoint", "build_tokenizer", "main"]
