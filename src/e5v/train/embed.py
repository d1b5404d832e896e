"""What a training step embeds, and how: the inference engine's own code.

Each text is cut to ``cutoff_len`` tokens (tokenised without special tokens, cut, decoded back; only when it
is longer), then prepared by the engine's :class:`~e5v.prepare.Preparer` (the backbone's chat format, rendering
and tokenisation; images decoded under the engine's limits and tiled by the backbone, e.g. AnyRes), collated by
the backbone (left padding, masked), run through :meth:`Backbone.forward` (the LoRA-wrapped language model alone
for text-only data, the whole multimodal model when the data has images), and pooled by the engine's
:func:`~e5v.batching.pool_last`. So the trained model is used at inference exactly as it was trained (tests:
training's vectors equal ``E5V.encode_text``'s and ``E5V.encode``'s). The image settings (pixel limits, alpha) are
the engine's, through its own :meth:`E5V.preparer <e5v.encoder.E5V.preparer>`. A bad run prompt is a
:class:`ConfigError` at once; a row with an anchor or positive the engine rejects (a corrupt image, say) is
dropped from its step with a warning that names it and the reason, and a rejected hard negative drops only itself.

The one other way, ``official_quirks``, lives apart in :mod:`e5v.train.official`. Both modes offer the same
three calls to the trainer: :meth:`shard` (this process's rows), :meth:`inputs` (anchors, positives, negatives and
the GradCache chunk plan) and :meth:`encoder` (chunk of items -> last-token states).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from .. import batching, prompts
from ..config import EngineConfig
from ..encoder import E5V
from ..errors import ConfigError, InputError
from ..items import Item
from ..prepare import check_prompt
from .data import Side, Triplet, default_prompt, shard

log = logging.getLogger(__name__)


def autocast_context(device: torch.device, dtype):
    """Mixed precision: the base LM is stored in ``dtype``; LoRA weights stay fp32 (peft) under autocast."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class EngineSentences:
    """The default mode: the engine's preparation, collation, forward and pooling (see the module docstring).

    ``multimodal``: the backbone holds the whole model, and chunks run through it (:meth:`Backbone.forward`
    without ``language_model``), images or not. ``images``: the engine's ``max_pixels`` and ``alpha`` (the
    resolution options act on the backbone itself, see :func:`e5v.train.trainer.training_backbone`)."""

    def __init__(self, backbone, *, prompt: str = "", cutoff_len: int = 32, max_length: int,
                 multimodal: bool = False, images: EngineConfig | None = None):
        self.backbone = backbone
        self.prompt = prompt or prompts.TEXT
        check_prompt(self.prompt)
        if prompts.SENT not in self.prompt or prompts.IMAGE in self.prompt:
            raise ConfigError(f"the training prompt is the text sides' one: it must contain {prompts.SENT} and no "
                              f"{prompts.IMAGE} (image sides take E5-V's image or composed prompt, or a side's "
                              f"own prompt): {self.prompt!r}")
        self.cutoff_len = int(cutoff_len)
        self.multimodal = multimodal
        images = images or EngineConfig()
        self.preparer = E5V(backbone, max_length=max_length, max_pixels=images.max_pixels,
                            alpha=images.alpha).preparer()
        self.lockstep: VisionInLockstep | None = None
        self.left_out: list[InputError] = []  # the rows :meth:`inputs` left out last, with their reasons
        self.negatives_left_out = 0  # ... and the hard negatives it dropped alone

    def cut(self, sentence: str) -> str:
        tok = self.backbone.tokenizer
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        return tok.decode(ids[: self.cutoff_len]) if len(ids) > self.cutoff_len else sentence

    def prepare_side(self, side: str | Side):
        """One side -> Features: a plain text with the run's prompt, a :class:`Side` with its own or its kind's."""
        if isinstance(side, str):
            return self.preparer.prepare(Item(text=self.cut(side), name=f"training sentence {side[:60]!r}"),
                                         self.prompt)
        text = self.cut(side.text) if side.text is not None else None
        return self.preparer.prepare(Item(text=text, image=side.image, name=side.name),
                                     default_prompt(side, self.prompt))

    def prepare(self, sentences: list[str | Side]) -> list:
        return [self.prepare_side(s) for s in sentences]

    def shard(self, rows: list[Triplet], rank: int, size: int) -> list[Triplet]:
        return shard(rows, rank, size)

    def inputs(self, rows: list[Triplet]):
        """(anchors, positives, hard negatives, chunk plan): None lets GradCache plan the chunks. A row whose
        anchor or positive the engine rejects is left out (a warning names it and the reason; :attr:`left_out`);
        a rejected hard negative is dropped alone, the pair stays (a warning says so)."""
        fields: tuple[list, list, list] = ([], [], [])
        self.left_out, self.negatives_left_out = [], 0
        for t in rows:
            try:
                pair = [self.prepare_side(t.anchor), self.prepare_side(t.positive)]
            except InputError as err:
                log.warning("training row left out of its step: %s", err)
                self.left_out.append(err)
                continue
            fields[0].append(pair[0])
            fields[1].append(pair[1])
            if t.negative is not None:
                try:
                    fields[2].append(self.prepare_side(t.negative))
                except InputError as err:
                    log.warning("hard negative left out of its step, the pair stays: %s", err)
                    self.negatives_left_out += 1
        return (*fields, None)

    def encoder(self, runner, device: torch.device, autocast=None):
        """Features of one chunk -> last-token final hidden states (fp32), through ``runner``: the LoRA LM, or
        with ``multimodal`` the multimodal base model (or the strategy's wrapper of it)."""
        if not self.multimodal:
            return last_token_encoder(self.backbone, self.backbone.collate, runner, device, autocast)
        view = self.backbone.without_model()
        view.model = _Holder(runner)  # Backbone.forward runs ``model.model``: the runner
        encode = last_token_encoder(view, view.collate, None, device, autocast)
        if self.lockstep is None:
            return encode

        def encode_in_lockstep(chunk) -> torch.Tensor:
            self.lockstep.active = not any(f.images for f in chunk)
            try:
                return encode(chunk)
            finally:
                self.lockstep.active = False

        return encode_in_lockstep

    def vision_in_lockstep(self, mm, lm) -> None:
        """Make every chunk run the vision side (see :class:`VisionInLockstep`)."""
        from PIL import Image

        tile = Image.new("RGB", (32, 32), (127, 127, 127))
        dummy = self.preparer.prepare(Item(image=tile, name="the lockstep image"), prompts.IMAGE_PROMPT)
        self.lockstep = VisionInLockstep(mm, lm, dummy.images)


class VisionInLockstep:
    """Runs the vision side on a dummy image, with weight 0, in a chunk that has no image of its own.

    Sharded strategies (ZeRO-3, FSDP) gather parameters and reduce gradients module by module, so every process
    must run the same modules in the same order: a process whose chunk holds only texts would skip the vision
    tower while another runs it. A forward pre-hook on the language model (``lm``) runs the tower and projector
    where an image chunk runs them (after the token embeddings, before the decoder layers) and adds 0 x their
    output to the input embeddings: the same modules, a zero gradient, the same vectors."""

    def __init__(self, mm, lm, images: dict[str, torch.Tensor]):
        self.mm, self.images, self.active = mm, images, False
        lm.register_forward_pre_hook(self.hook, with_kwargs=True, prepend=True)  # before ZeRO-3's own hooks

    def hook(self, module, args, kwargs):
        if not self.active or kwargs.get("inputs_embeds") is None:
            return None
        embeds = kwargs["inputs_embeds"]
        with torch.random.fork_rng(devices=[embeds.device] if embeds.device.type == "cuda" else []):
            # its dropout masks must not shift the chunk's: the vectors stay those of the other strategies
            out = self.mm.get_image_features(**{k: v.to(embeds.device) for k, v in self.images.items()})
        used = getattr(out, "pooler_output", out)  # what the model puts in the sequence (the projector's output)
        zero = sum(t.float().sum() for t in _tensors(used)) * 0
        return args, {**kwargs, "inputs_embeds": embeds + zero.to(embeds.dtype)}


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, a list or tuple, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


class _Holder:
    """Stands for the full model in :meth:`Backbone.forward`, whose base model (``.model``) is the runner."""

    def __init__(self, base):
        self.model = base


def last_token_encoder(backbone, collate, runner, device: torch.device, autocast=None):
    """Chunk -> ``collate`` -> ``runner`` (the LoRA LM, through :meth:`Backbone.forward`) -> the engine's pooling:
    last-token final hidden states (fp32). Both modes' encoder; they differ only in ``collate``."""

    def encode(chunk) -> torch.Tensor:
        batch = batching.to_device(collate(chunk), device)
        with autocast_context(device, autocast):
            hidden = backbone.forward(batch, language_model=runner)
        return batching.pool_last(hidden).float()

    return encode


def make_sentences(cfg, backbone, max_length: int, multimodal: bool = False):
    """The mode the settings ask for: the engine's (default) or the released code's (``official_quirks``)."""
    if cfg.official_quirks:
        from .official import OfficialQuirks

        return OfficialQuirks(backbone, prompt=cfg.prompt, cutoff_len=cfg.cutoff_len,
                              group_size=-(-cfg.batch_size // cfg.official_world_size))
    return EngineSentences(backbone, prompt=cfg.prompt, cutoff_len=cfg.cutoff_len, max_length=max_length,
                           multimodal=multimodal, images=cfg.engine_config())
