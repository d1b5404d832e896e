"""One training step of E5-V's recipe on the Llama-3-8B shape (random weights), two ways in the same run:

- ``plain``: the plain transformers + peft step (the GPU anchor: 123 sentences/s on one H100): one forward of
  the whole contrastive batch with gradient checkpointing, InfoNCE, backward, AdamW;
- ``e5v``: e5v's step: GradCache chunks of ``--chunk`` sequences without checkpointing (chunks of sorted
  lengths), same loss and gradients.

Weights are random (speed does not depend on their values), built from the llama3-llava-next-8b config that e5v
ships (src/e5v/bench/llama3-llava-next-8b/config.json, its ``text_config``); LoRA r=64 alpha=16 dropout 0.05
on q,k,v,o,gate,up,down; sentences of ``--tokens`` tokens (prompt included), a third of them hard negatives.
Prints one JSON line per path.

``--images``: e5v's step on image-caption pairs through the whole multimodal model (``images`` path): each image
(COCO-sized JPEG file, the image prompt, AnyRes tiles) against its caption (the text prompt), the vision tower frozen
(``--train-projector``, ``--vision-lora`` to train it); the real llama3-llava-next-8b architecture with random
weights, ``--tiny`` its geometry with narrow layers, or ``--model DIR`` a checkpoint (e.g. the bundled mini model).
A timed step is what a training step does: prepare the batch (decode, tile, tokenise: ``prepare_s``), then
GradCache (chunks of at most ``--chunk`` sequences and ``--chunk-tokens`` padded tokens) and AdamW; ``step_s``,
sentences/s (images and captions) and images/s are of the whole step. Also the peak memory (GPU: allocated; CPU:
the process's RSS).

GPU:   python benchmarks/train_step.py --device cuda --dtype bfloat16 --triplets 128 --chunk 96
       python benchmarks/train_step.py --images --device cuda --dtype bfloat16 --triplets 32 --chunk 72 \
           --e5v-checkpointing
CPU:   python benchmarks/train_step.py --tiny
       python benchmarks/train_step.py --images --model src/e5v/toyworld/mini-before-c --triplets 32 --chunk 16
"""
from __future__ import annotations

import argparse
import json
import time

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=1000, bos_token_id=None, eos_token_id=None)


def build(args):
    from transformers import LlamaConfig, LlamaModel

    from e5v.bench.model import CONFIG

    text = json.loads(CONFIG.read_text())["text_config"]
    if args.tiny:
        text.update(TINY)
    config = LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"})
    config.use_cache = False
    if args.attn:
        config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):  # built in place, in its dtype: no fp32 copy, no CPU->GPU transfer of 15 GB
        lm = LlamaModel._from_config(config, dtype=getattr(torch, args.dtype))
    return lm, config


def run(args) -> list[dict]:
    from types import SimpleNamespace

    from e5v.backbones import Backbone, Features
    from e5v.train.embed import EngineSentences
    from e5v.train.gradcache import contrastive_step
    from e5v.train.model import add_lora, set_checkpointing

    device = torch.device(args.device)
    t0 = time.perf_counter()
    lm, config = build(args)
    build_s = time.perf_counter() - t0
    model = add_lora(lm, r=args.lora_r, alpha=16, dropout=0.05, gradient_checkpointing=False)
    dtype = getattr(torch, args.dtype)
    # training's embedding code (the engine's collation, forward and pooling) on given token ids: no tokenizer
    backbone = Backbone(None, SimpleNamespace(pad_token_id=0, eos_token_id=0), None, chat_format="raw")
    encode = EngineSentences(backbone, max_length=1 << 30).encoder(
        torch.compile(lm) if args.compile else lm, device, autocast=dtype if dtype != torch.float32 else None)
    opt = torch.optim.AdamW(model.trainable, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    n = args.triplets

    def sents(k):
        return [Features(ids) for ids in torch.randint(10, config.vocab_size, (k, args.tokens), generator=g)]

    batch = (sents(n), sents(n), sents(n))
    results = []
    for name, chunk, ckpt in (("plain", 3 * n, True), ("e5v", args.chunk, args.e5v_checkpointing)):
        if name == "plain" and args.skip_plain:
            continue
        set_checkpointing(model.lm, ckpt)
        model.lm.train()
        sec, res = timed_steps(args, device, model, opt, lambda chunk=chunk: contrastive_step(
            encode, *batch, chunk_size=chunk, sort_by_length=True, device=device))
        results.append({"path": name, "triplets": n, "tokens": args.tokens, "chunk_sequences": min(chunk, 3 * n),
                        "chunks": res.chunks, "checkpointing": _checkpointing(model.lm),
                        "sentences_per_s": round(3 * n / sec, 2), "step_s": round(sec, 4), "loss": round(res.loss, 4),
                        **_where(args, device), "build_s": round(build_s, 1), "compile": args.compile})
        print(json.dumps(results[-1]), flush=True)
    return results


def timed_steps(args, device, model, opt, step):
    """(median seconds, last result of ``step()``) of ``args.steps`` optimiser steps after ``args.warmup``; peak
    memory counted from here."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        res = step()
        torch.nn.utils.clip_grad_norm_(model.trainable, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], res


def _checkpointing(lm) -> bool:
    on = getattr(lm, "is_activation_checkpointing", None)  # transformers >= 5.24
    return bool(lm.is_gradient_checkpointing if on is None else on)


def _where(args, device) -> dict:
    import resource

    gpu = device.type == "cuda"
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if gpu else None,
            "peak_rss_gib": None if gpu else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "dtype": args.dtype, "tiny": args.tiny}


def run_images(args) -> list[dict]:
    """e5v's step on image-caption pairs through the whole multimodal model (module docstring): each timed step
    prepares its batch as training does (the JPEG files decoded, tiled and tokenised), then runs GradCache."""
    import tempfile
    from pathlib import Path

    from e5v.bench.inputs import make_images, make_texts
    from e5v.train.data import Side, Triplet
    from e5v.train.embed import EngineSentences
    from e5v.train.gradcache import contrastive_step
    from e5v.train.model import add_lora, load_language_model

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.model:
        from e5v.train.trainer import training_backbone

        lm, config, full = load_language_model(args.model, dtype=dtype, device=device, load_vision=True)
        backbone = training_backbone(args.model, config, full)
    else:
        from e5v.bench.model import build_backbone, build_config

        backbone = build_backbone(build_config(tiny=args.tiny), device=device, dtype=dtype,
                                  attn_implementation=args.attn)
        full, lm = backbone.model, backbone.model.model.language_model
    build_s = time.perf_counter() - t0
    model = add_lora(lm, r=args.lora_r, alpha=16, dropout=0.05, gradient_checkpointing=args.e5v_checkpointing,
                     full=full, train_projector=args.train_projector, vision_lora=args.vision_lora)
    mode = EngineSentences(backbone, max_length=backbone.max_length, multimodal=True)
    encode = mode.encoder(model.runner, device, autocast=dtype if dtype != torch.float32 else None)
    opt = torch.optim.AdamW(model.trainable, lr=1e-5)
    n, prepare_times = args.triplets, []
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, data in enumerate(make_images(n)):
            paths.append(Path(folder) / f"{i}.jpg")
            paths[-1].write_bytes(data)
        rows = [Triplet(Side(image=str(p), name=p.name), caption) for p, caption in zip(paths, make_texts(n, backbone))]

        def step():
            t = time.perf_counter()
            images, captions, _, _ = mode.inputs(rows)
            prepare_times.append(time.perf_counter() - t)
            return contrastive_step(encode, images, captions, [], chunk_size=args.chunk,
                                    chunk_tokens=args.chunk_tokens or None, sort_by_length=True, device=device), \
                images, captions

        sec, (res, images, captions) = timed_steps(args, device, model, opt, step)
    prepare_s = sorted(prepare_times[args.warmup:])[len(prepare_times[args.warmup:]) // 2]
    result = {"path": "images", "pairs": n, "image_tokens": round(sum(map(len, images)) / n),
              "caption_tokens": round(sum(map(len, captions)) / n), "chunk_sequences": args.chunk,
              "chunk_tokens": args.chunk_tokens, "chunks": res.chunks, "checkpointing": _checkpointing(model.lm),
              "trained": "lm-lora" + ("+projector" if args.train_projector else "")
              + ("+vision-lora" if args.vision_lora else ""),
              "sentences_per_s": round(2 * n / sec, 2), "images_per_s": round(n / sec, 2), "step_s": round(sec, 4),
              "prepare_s": round(prepare_s, 4), "loss": round(res.loss, 4), **_where(args, device),
              "model": args.model or ("llama3-llava-next-8b (random)" if not args.tiny else "tiny llava-next"),
              "build_s": round(build_s, 1)}
    print(json.dumps(result), flush=True)
    return [result]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--tiny", action="store_true", help="a tiny config of the same family (CPU smoke run)")
    p.add_argument("--triplets", type=int, default=128, help="contrastive batch, in triplets (--images: pairs)")
    p.add_argument("--tokens", type=int, default=44, help="tokens per sentence, prompt included")
    p.add_argument("--chunk", type=int, default=96, help="e5v: sequences per GradCache chunk (at most)")
    p.add_argument("--chunk-tokens", type=int, default=16384,
                   help="--images: padded tokens per GradCache chunk (at most; training's micro_batch_tokens; 0: none)")
    p.add_argument("--e5v-checkpointing", action="store_true", help="e5v: also checkpoint (bigger chunks)")
    p.add_argument("--compile", action="store_true", help="torch.compile the language model")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--images", action="store_true", help="image-caption pairs through the whole model")
    p.add_argument("--model", default="", help="--images: a checkpoint directory instead of the random 8B")
    p.add_argument("--train-projector", action="store_true", help="--images: train the projector too")
    p.add_argument("--vision-lora", action="store_true", help="--images: LoRA on the vision tower too")
    args = p.parse_args(argv)
    return run_images(args) if args.images else run(args)


if __name__ == "__main__":
    main()
