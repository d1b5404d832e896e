"""The training loop: E5-V's contrastive recipe (text triplets, or sides with images), on one process or many
(torchrun, accelerate launch, the deepspeed launcher).

One optimiser step = one global contrastive batch (``batch_size`` triplets, split across processes), run through
:func:`e5v.train.gradcache.contrastive_step`; gradients summed over processes, clipped, AdamW, linear warm-up
then linear decay. What is embedded and how: :mod:`e5v.train.embed` (the engine's own code) or, with
``official_quirks``, :mod:`e5v.train.official`. How the processes share the work (plain all-reduce, DeepSpeed
ZeRO-2/3, FSDP2) is a strategy of :mod:`e5v.train.parallel`; all of them compute the same step. Everything a step
depends on is a function of (seed, step): the batch's rows (:class:`e5v.train.data.Sampler`, mixtures of several
files too) and the dropout seed. Data with images loads the whole multimodal model. So a run killed at any moment
and restarted from its last checkpoint (trainable weights, optimiser, scheduler and loss-scaler state, written
atomically) ends with the same adapter as a run that was never interrupted.

Output directory: ``checkpoints/step-NNNNNN/`` (adapter + trainer state), ``adapter/`` (the final LoRA
adapter, with :data:`e5v.adapters.VISION_FILE` when the vision side trained), ``log.jsonl`` (one record per
logged step), ``tensorboard/`` when TensorBoard is installed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import VISION_FILE
from ..backbones import load_config, select
from ..errors import ConfigError, InputError
from .config import TrainConfig
from .data import Sampler, Triplet, data_files, first_side, has_images, parse_weights, read_triplets
from .embed import make_sentences
from .gradcache import contrastive_step, plan_chunks
from .loss import world
from .model import add_lora, load_language_model, wants_4bit
from .parallel import make_strategy, require_deepspeed

log = logging.getLogger(__name__)

#: Settings a resumed run may change (they do not change what is computed, or only its speed/memory use).
RESUMABLE_CHANGES = frozenset({"progress", "logging_steps", "save_steps", "save_total_limit", "tensorboard",
                               "device", "compile", "attn_implementation", "micro_batch_size", "micro_batch_tokens",
                               "sort_by_length", "gradient_checkpointing", "output_dir"})
#: ... except with LoRA dropout: the chunks draw their dropout masks one after the other from the step's seed, so
#: other chunks (or compiled kernels, which draw their own way) get other masks.
DROPOUT_MASKS = frozenset({"micro_batch_size", "micro_batch_tokens", "sort_by_length", "compile"})


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank). Starts torch.distributed when launched by torchrun / accelerate launch
    (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank, size = world()
    return rank, size, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_train_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: the mixed precision of an ``accelerate launch`` yaml when it sets one, else the engine's rule for
    training (bf16 on a GPU that has it, fp16 on one that does not, fp32 on CPU)."""
    from ..config import resolve_dtype

    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(os.environ.get("ACCELERATE_MIXED_PRECISION", ""), "auto")
    return resolve_dtype(name, device, training=True)


def lr_lambda(warmup: int, total: int):
    """HF's linear schedule: 0 -> 1 over ``warmup`` steps, then linearly to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class Logger:
    """One record per logged step to the console (logging), ``log.jsonl`` and TensorBoard (when installed)."""

    def __init__(self, out: Path, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run: drop records past the checkpoint, they are redone
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            from ..parts import atomic_write_bytes

            atomic_write_bytes(self.path, "".join(k + "\n" for k in keep).encode())
        self.fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.info("TensorBoard is not installed; logging to %s only", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        extra = (f", {record['images_per_s']:.1f} images/s" if "images_per_s" in record else "") + \
            (f", {record['skipped']} rows left out" if record.get("skipped") else "") + \
            (f", {record['skipped_negatives']} hard negatives left out" if record.get("skipped_negatives") else "")
        log.info("step %d/%d loss %.4f lr %.3g grad-norm %.3g %.1f sentences/s (%d candidates per anchor)%s",
                 record["step"], record["total"], record["loss"], record["lr"], record["grad_norm"],
                 record["sentences_per_s"], record["candidates"], extra)
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "sentences_per_s"):
                self.tb.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(root.glob("step-*")) if root.exists() else []


def write_adapter(model, folder: Path, weights: dict) -> None:
    """The LM adapter (peft) and, when the vision side trains, :data:`VISION_FILE` into ``folder``
    (``weights``: the full trainable tensors by name)."""
    from safetensors.torch import save_file

    lm, vision = model.split(weights)
    model.peft.save_pretrained(str(folder), state_dict=lm)
    if vision:
        save_file({k: v.detach().cpu().contiguous() for k, v in vision.items()}, str(folder / VISION_FILE),
                  metadata={"lora_scale": repr(model.vision_scale)})


def save_adapter_dir(model, dest: Path, weights: dict) -> None:
    """Save the adapter to ``dest`` atomically (written beside it, then renamed into place)."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(model, tmp, weights)
    _publish_dir(tmp, dest)


def _publish_dir(tmp: Path, dest: Path) -> None:
    """Sync the files of ``tmp`` to disk and rename it onto ``dest`` (an older ``dest`` is moved aside first)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def save_checkpoint(out: Path, step: int, cfg: TrainConfig, model, strategy, rank: int, size: int) -> None:
    """Adapter + trainer state (+ DeepSpeed's files) into ``checkpoints/step-N``, written beside it and renamed
    into place. A collective: every process calls it (sharded weights and optimizer state are gathered)."""
    dest = out / "checkpoints" / f"step-{step:06d}"
    tmp = dest.parent / f".tmp-{dest.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(size)
    weights = strategy.full_weights()
    state = strategy.save(tmp)
    _barrier(size)
    if rank == 0:
        write_adapter(model, tmp, weights)
        torch.save({"step": step, **state}, tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        _publish_dir(tmp, dest)
        for old in checkpoint_dirs(out)[:-max(1, cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", dest)
    _barrier(size)


def read_checkpoint(ckpt: Path, cfg: TrainConfig, model) -> dict:
    """Check the settings, put the checkpoint's LoRA weights into the (not yet wrapped) model; the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    diff = changed_settings(json.loads((ckpt / "train_config.json").read_text()), cfg)
    if diff:
        raise ConfigError(f"{ckpt} was written with other settings ({', '.join(diff)}); use the same settings "
                          "to resume, or another output_dir to start afresh")
    weights = load_file(str(ckpt / "adapter_model.safetensors"), device=str(model.trainable[0].device))
    result = set_peft_model_state_dict(model.peft, weights)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"{ckpt}: adapter does not fit the model ({result.unexpected_keys[:3]})")
    if model.vision:
        model.load_vision(load_file(str(ckpt / VISION_FILE), device=str(model.trainable[0].device)))
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` that differ from a checkpoint's (``saved``) and that a resumed run may not change."""
    defaults = TrainConfig().to_dict()  # a setting newer than the checkpoint had its default value then
    free = RESUMABLE_CHANGES - (DROPOUT_MASKS if cfg.lora_dropout > 0 else frozenset())
    return sorted(k for k, v in cfg.to_dict().items() if k not in free and saved.get(k, defaults[k]) != v)


def _barrier(size: int) -> None:
    if size > 1:
        torch.distributed.barrier()


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_run_length(n: int, batch_size: int, warmup: int, total: int) -> None:
    """Say when the settings cannot train as the user expects (e.g. the defaults on a small file)."""
    if batch_size > n:
        log.warning("batch_size %d is larger than the data (%d pairs): every step trains on all %d pairs, one step "
                    "per epoch; lower --batch-size to take more steps", batch_size, n, n)
    if warmup >= total:
        log.warning("warmup_steps %d is not below the run's %d step(s): the learning rate only ramps up (%s of "
                    "--learning-rate at the first step, %.0f%% at the last), so the run trains little or nothing; "
                    "lower --warmup-steps or train longer", warmup, total, "0%", 100 * (total - 1) / max(1, warmup))


def training_backbone(path: str, config, full=None, chat_format: str | None = None, images=None):
    """The backbone's preparation for training: texts only (no model), or with ``full`` (the whole model,
    whose processor and image token are fixed against it as the engine's loading does) for images, with the
    resolution options of ``images`` (an :class:`~e5v.config.EngineConfig`) set as the engine's loading sets them."""
    family = select(config)
    if full is None:
        return family.for_text(path, chat_format=chat_format)
    backbone = family(full, **family.load_preprocessing(path, full), chat_format=chat_format, path=str(path))
    if images is not None:
        backbone.limit_images(images)
    return backbone


@dataclass
class Run:
    """Everything one training run holds: the data, the LoRA-wrapped model, the strategy that shares it among
    the processes, the encoder of sentences and where the run stands."""

    cfg: TrainConfig
    rank: int
    size: int
    device: torch.device
    out: Path
    triplets: list
    sampler: Sampler
    model: Any
    strategy: Any
    mode: Any
    encode: Any
    per_epoch: int
    total: int
    start: int


def start_run(cfg: TrainConfig) -> Run:
    """Load the data and the model, add LoRA, shard it among the processes and resume from the last checkpoint."""
    cfg.validate()
    if cfg.deepspeed:
        require_deepspeed()  # fail before loading anything
    rank, size, local_rank = init_distributed()
    device = pick_device(cfg, local_rank)
    dtype = resolve_train_dtype(cfg.dtype, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = [read_triplets(f, cfg.image_root) for f in data_files(cfg.data)]
    triplets = [t for rows in sources for t in rows]
    sampler = Sampler([len(rows) for rows in sources], cfg.batch_size, cfg.seed,
                      parse_weights(cfg.data_weights, len(sources)), cfg.single_source_batches)
    images = has_images(triplets)
    side = first_side(triplets)
    if cfg.official_quirks and side is not None:
        raise ConfigError(f"official_quirks reproduces the text-only release, but the data has image sides or "
                          f"prompts of their own (first: {side.name}); drop --official-quirks")

    quant = wants_4bit(cfg.load_in_4bit, device, images)
    select(load_config(cfg.model)).check_load(dtype, cfg.attn_implementation or None)
    lm, config, full = load_language_model(cfg.model, dtype=dtype, device=device, load_in_4bit=quant,
                                           load_vision=cfg.load_vision or images,
                                           attn_implementation=cfg.attn_implementation or None)
    backbone = training_backbone(cfg.model, config, full if images else None, cfg.chat_format or None,
                                 cfg.engine_config())
    mode = make_sentences(cfg, backbone, getattr(lm.config, "max_position_embeddings", 0) or 1 << 30,
                          multimodal=images)
    torch.manual_seed(cfg.seed)  # the LoRA initialisation
    model = add_lora(lm, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.targets,
                     gradient_checkpointing=cfg.gradient_checkpointing, full=full if images else None,
                     train_projector=cfg.train_projector, vision_lora=cfg.vision_lora)
    ckpts = checkpoint_dirs(out)
    state = read_checkpoint(ckpts[-1], cfg, model) if ckpts else None  # weights in before any sharding

    per_epoch = sampler.per_epoch
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    if rank == 0:
        check_run_length(len(triplets), cfg.batch_size, cfg.warmup_steps, total)

    def make_optimizer(params):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, total))

    strategy = make_strategy(cfg, model, make_optimizer, make_scheduler, dtype=dtype, device=device,
                             world_size=size, quantized=quant)
    start = 0
    if state is not None:
        strategy.load(ckpts[-1], state)
        start = int(state["step"])
        log.info("resumed from %s (step %d)", ckpts[-1], start)
    if images and size > 1 and strategy.lockstep:
        mode.vision_in_lockstep(model.mm, model.lm)
    runner = torch.compile(strategy.runner) if cfg.compile else strategy.runner
    encode = mode.encoder(runner, device, autocast=dtype if dtype != torch.float32 else None)
    return Run(cfg, rank, size, device, out, triplets, sampler, model, strategy, mode, encode, per_epoch, total,
               start)


#: What a process embeds, with weight 0, when it has no row of the step (see ``filler`` in contrastive_step).
FILLER = Triplet("filler", "filler")


def run_step(run: Run, step: int) -> dict:
    """One optimiser step over the global batch of ``step``; returns its log record."""
    cfg, t0 = run.cfg, time.perf_counter()
    torch.manual_seed(cfg.seed + 7919 * step + 104729 * run.rank)  # dropout: a function of (seed, step, rank)
    rows = [run.triplets[i] for i in run.sampler.indices(step)]
    local = run.mode.shard(rows, run.rank, run.size)
    anchors, positives, negatives, plan = run.mode.inputs(local)
    left_out = getattr(run.mode, "left_out", [])  # the official mode leaves nothing out
    seqs = anchors + positives + negatives
    if plan is None:
        plan = plan_chunks([len(s) for s in seqs], cfg.micro_batch_size, cfg.sort_by_length, cfg.micro_batch_tokens)
    counts = torch.tensor([len(local) - len(anchors), getattr(run.mode, "negatives_left_out", 0), len(seqs),
                           sum(bool(getattr(f, "images", None)) for f in seqs)], device=run.device)
    most = torch.tensor([len(plan)], device=run.device)
    if run.size > 1:
        torch.distributed.all_reduce(counts)
        if run.strategy.lockstep:
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    skipped, skipped_negatives, sentences, images = counts.tolist()
    if sentences == 0:  # every process left every row out: the data or a setting is broken, not a few items
        first = f" (first: {left_out[0]})" if left_out else ""
        raise InputError(f"step {step + 1}", f"all {len(rows)} rows of the batch were left out{first}; see the "
                                             "warnings above for each one (a wrong image folder, --image-root?)")
    lockstep = run.size > 1 and run.strategy.lockstep
    lr = run.strategy.scheduler.get_last_lr()[0]
    run.strategy.zero_grad()
    res = contrastive_step(
        run.encode, anchors, positives, negatives, temperature=cfg.temperature, device=run.device,
        backward=run.strategy.backward, plan=plan, min_chunks=int(most) if lockstep else 0,
        filler=run.mode.inputs([FILLER])[0] if lockstep or not anchors else None)
    if not math.isfinite(res.loss):
        raise FloatingPointError(f"step {step + 1}: non-finite loss {res.loss}; try --dtype "
                                 "bfloat16/float32 or a lower learning rate")
    try:
        grad_norm = run.strategy.step()
    except FloatingPointError as exc:
        raise FloatingPointError(f"step {step + 1}: {exc}") from None
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    record = {"step": step + 1, "total": run.total, "epoch": round((step + 1) / run.per_epoch, 4),
              "loss": res.loss, "lr": lr, "grad_norm": grad_norm, "sentences_per_s": sentences / seconds,
              "candidates": res.candidates, "chunks": res.chunks, "seconds": seconds, "skipped": skipped,
              "skipped_negatives": skipped_negatives}
    if run.model.mm is not None:
        record["images_per_s"] = images / seconds
    source = run.sampler.source_of(step)
    if source is not None:
        record["source"] = source
    return record


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the directory of the final adapter."""
    run = start_run(cfg)
    logger = Logger(run.out, run.start, enabled=run.rank == 0, tensorboard=cfg.tensorboard)
    if run.rank == 0:
        chunks = f"padded groups of {run.mode.group_size} triplets (the official layout)" if cfg.official_quirks \
            else f"at most {cfg.micro_batch_size} sequences and {cfg.micro_batch_tokens} padded tokens per forward pass"
        log.info("%d pairs, %d steps per epoch, %d steps (from step %d); global batch %d triplets on %d "
                 "process(es) (%s), %s", len(run.triplets), run.per_epoch, run.total, run.start, cfg.batch_size,
                 run.size, run.strategy.name, chunks)
    bar = None
    if cfg.progress and run.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total, initial=run.start, unit="step", dynamic_ncols=True)
    try:
        for step in range(run.start, run.total):
            record = run_step(run, step)
            done = record["step"]
            if done % cfg.logging_steps == 0 or done == run.total:
                logger.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                sent_s=f"{record['sentences_per_s']:.0f}")
                bar.update(1)
            if done % cfg.save_steps == 0 or done == run.total:
                save_checkpoint(run.out, done, cfg, run.model, run.strategy, run.rank, run.size)
        final = run.out / "adapter"
        weights = run.strategy.full_weights()
        if run.rank == 0:
            save_adapter_dir(run.model, final, weights)
            log.info("adapter saved to %s", final)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    _barrier(run.size)
    return final
