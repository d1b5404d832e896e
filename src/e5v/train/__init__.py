"""E5-V's contrastive training: LoRA on the language model, InfoNCE over the global batch with hard negatives,
GradCache, multi-process (torchrun / accelerate launch), exact resume; text triplets (the E5-V recipe) or sides with
images (the whole model, the vision side frozen or trained); ``e5v train`` and ``e5v merge``.

``from e5v.train import TrainConfig, make_config, train`` (imports torch/transformers lazily); merging an adapter
into its base: ``from e5v.train.merge import merge``."""
from __future__ import annotations


def __getattr__(name):
    if name in ("TrainConfig", "make_config", "read_config_file"):
        from . import config

        return getattr(config, name)
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(name)


__all__ = ["TrainConfig", "make_config", "read_config_file", "train"]
