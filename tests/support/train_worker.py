"""Helper script of tests/train/test_train*.py, run in subprocesses (plain python or torchrun)."""
from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)


def lora_model(model_dir: str, *, dropout: float = 0.0, b_std: float = 0.05, checkpointing: bool = False):
    """(lm, LoraModel): tiny LM with seeded LoRA whose B matrices are random (not zero), so that
    every LoRA weight gets a gradient and dropout changes the output."""
    from e5v.train.model import add_lora, load_language_model

    lm, _, _ = load_language_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = add_lora(lm, r=4, alpha=8, dropout=dropout, gradient_checkpointing=checkpointing)
    return lm, _random_b(model, b_std)


def _random_b(model, b_std: float):
    with torch.no_grad():
        for n, p in model.named_trainable().items():
            if "lora_B" in n:
                p.normal_(0, b_std)
    return model


def sentences(model_dir: str, **options):
    """Training's default mode (the engine's preparation, collation and pooling) for a checkpoint."""
    from transformers import AutoConfig

    from e5v.backbones import select
    from e5v.train.embed import EngineSentences

    backbone = select(AutoConfig.from_pretrained(model_dir)).for_text(model_dir)
    return EngineSentences(backbone, max_length=2048, **options)


def image_model(model_dir: str, *, dropout: float = 0.0, b_std: float = 0.05, train_projector: bool = True,
                vision_lora: bool = True, dtype: torch.dtype = torch.float32):
    """(LoraModel, EngineSentences) for data with images: the whole tiny model (in ``dtype``), seeded LoRA on the
    LM (and on the tower) with random B matrices, the projector trainable; the mode embeds through the multimodal
    model."""
    from e5v.train.embed import EngineSentences
    from e5v.train.model import add_lora, load_language_model
    from e5v.train.trainer import training_backbone

    lm, config, full = load_language_model(model_dir, dtype=dtype, device=torch.device("cpu"), load_vision=True)
    backbone = training_backbone(model_dir, config, full)
    torch.manual_seed(0)
    model = add_lora(lm, r=4, alpha=8, dropout=dropout, gradient_checkpointing=False, full=full,
                     train_projector=train_projector, vision_lora=vision_lora)
    return _random_b(model, b_std), EngineSentences(backbone, max_length=2048, multimodal=True)


def grads(model_dir: str, data: str, out: str) -> None:
    """This process's shard of one global batch: loss and gradients after the sum over processes (data with
    images: through the whole model, the projector and tower LoRA trained too)."""
    from e5v.train.data import has_images, read_triplets, shard
    from e5v.train.gradcache import contrastive_step
    from e5v.train.loss import all_reduce_grads
    from e5v.train.trainer import init_distributed

    rank, size, _ = init_distributed()
    rows = read_triplets(data)
    if has_images(rows):
        model, sents = image_model(model_dir)
    else:
        _, model = lora_model(model_dir)
        sents = sentences(model_dir)
    anchors, positives, negatives, _ = sents.inputs(shard(rows, rank, size))
    res = contrastive_step(sents.encoder(model.runner, torch.device("cpu")), anchors, positives, negatives,
                           chunk_size=int(os.environ.get("CHUNK", 4)))
    all_reduce_grads(model.trainable)
    if rank == 0:
        torch.save({"loss": res.loss, "candidates": res.candidates,
                    "grads": {n: p.grad.clone() for n, p in model.named_trainable().items()}}, out)
    if size > 1:  # together, after every rank is done (a rank that leaves early can abort its peer's gloo
        torch.distributed.barrier()  # threads); and explicitly: at interpreter exit they can abort the process
        torch.distributed.destroy_process_group()


def train(config_json: str) -> None:
    from e5v.train import make_config, train as run

    run(make_config(**json.loads(config_json)))


def strategies(config_json: str, variants_json: str) -> None:
    """Under torchrun: train the same config once per variant (e.g. {"deepspeed": "configs/deepspeed/zero2.json"}),
    each into OUTPUT_DIR/<name>; then resume each run from its first checkpoint into OUTPUT_DIR/<name>-resumed."""
    import shutil
    from pathlib import Path

    from e5v.train import make_config, train as run

    try:  # DeepSpeed's CPU collectives are gloo's once its shared-memory kernel is ruled out; building that
        import deepspeed.ops  # kernel takes 1.5 min of C++ compilation on a fresh machine. Same results.

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        pass
    base = json.loads(config_json)
    rank = int(os.environ.get("RANK", "0"))
    for name, variant in json.loads(variants_json).items():
        out = Path(base["output_dir"]) / name
        run(make_config(**{**base, **variant, "output_dir": str(out)}))
        again = out.with_name(name + "-resumed")
        if rank == 0:  # as if killed after the first checkpoint: the later ones and the adapter are lost
            shutil.copytree(out, again)
            shutil.rmtree(again / "adapter")
            for ckpt in sorted((again / "checkpoints").glob("step-*"))[1:]:
                shutil.rmtree(ckpt)
            log = [json.loads(x) for x in (again / "log.jsonl").read_text().splitlines()]
            log[0]["before_kill"] = True  # kept only if the rerun resumes from step 1 (else it is rewritten)
            (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        torch.distributed.barrier()
        run(make_config(**{**base, **variant, "output_dir": str(again)}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    {"grads": grads, "train": train, "strategies": strategies}[sys.argv[1]](*sys.argv[2:])
