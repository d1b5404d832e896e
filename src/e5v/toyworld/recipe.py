"""The recipe of the bundled mini model: a LLaVA-NeXT-architecture model trained from scratch on the toy world.

- **Build**: a byte-level BPE tokenizer on the toy language, a CLIP-style vision tower, the LLaVA-NeXT
  projector and a Llama language model with the Llama-3 chat format, random weights.
- **Stage A** (language model, text only): captions of both registers as plain text; plain-register paraphrase,
  edit and question instructions; one-word summaries (``<caption>\nSummary above sentence in one word: `` ->
  one of the scene's words, drawn at random). The toy analogue of a pretrained LLM's ability to summarise.
- **Stage V** (vision tower): which shape and colour is at each place; the toy analogue of LLaVA's pretrained
  CLIP tower. Without it the tower learns colour and little else through the frozen language model.
- **Stage B** (visual instruction tuning; tower, projector and image newline, language model frozen): captions,
  edits and one-word answers about pictures. The E5-V image prompt ("Summary above image in one word") is never
  trained: it works zero-shot or not at all.
- **Stage C** (E5-V): text-only contrastive training with :func:`e5v.train.train` (what ``e5v train`` runs) on toy
  NLI triplets (anchor, paraphrase in either register, the anchor with one attribute changed), then
  :func:`e5v.train.merge.merge` (``e5v merge``).

No held-out triple occurs in any training text or picture (stage A/B edit answers and stage C hard negatives
included: :func:`world.changed` keeps to training triples). The recipe runs with its own thread count and
deterministic kernels (:func:`fixed_threads`), so the weights do not depend on the machine's thread count.

``python -m e5v.toyworld.recipe OUT`` rebuilds the model (seeded; the run time is in docs/toyworld.md);
``--base DIR`` runs stage C only, from a model before stage C; ``--quick`` runs a shortened recipe in seconds (the
test suite's end-to-end check).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import prompts
from . import world

log = logging.getLogger(__name__)

PARAPHRASE = "<sent>\nSay the above sentence in other words."
EDIT = '<sent>\nRewrite the above sentence to "<edit>".'
#: Stage B's instructions: two captioning requests, and stage A's paraphrase and edit requests about an image.
DESCRIBE = ("<image>\nDescribe the image.", "<image>\nWhat does the picture show?",
            PARAPHRASE.replace("<sent>", "<image>").replace("sentence", "image"))
IMAGE_EDIT = EDIT.replace("<sent>", "<image>").replace("sentence", "image")
SUMMARY_NOUNS = ("sentence", "sentence", "text", "caption", "description")   # E5-V's own word twice as often


@dataclass
class Recipe:
    seed: int = 0
    batch: int = 32
    a_steps: int = 2000              # stage A: language model on text
    a_lr: float = 1e-3
    v_steps: int = 600               # stage V: the vision tower learns to see
    v_lr: float = 2e-3
    b_steps: int = 2500              # stage B: visual instruction tuning
    b_lr: float = 2e-3
    c_triplets: int = 2048           # stage C: toy NLI triplets for `e5v train`
    c_batch: int = 64
    c_steps: int = 60
    c_lr: float = 4e-4
    c_lora_r: int = 8
    c_lora_alpha: int = 16
    c_warmup: int = 6
    c_seed: int = 0                  # stage C's own seed: its triplets, LoRA initialisation and order
    c_shuffle: bool = False          # the control: positives and hard negatives shuffled across rows
    threads: int = 1                 # intra-op threads (see fixed_threads)


QUICK = Recipe(batch=8, a_steps=6, v_steps=4, b_steps=6, c_triplets=32, c_batch=8, c_steps=2, c_warmup=0)


# --- the model ------------------------------------------------------------------------------------------------
def corpus(seed: int) -> list[str]:
    """Texts the tokenizer is trained on: captions of both registers, instructions, every E5-V prompt."""
    rng = random.Random(seed)
    lines = [world.caption(s, rng, rich=r) for s in world.scenes("train", 600, seed=seed) for r in (False, True)]
    words = [w for c in world.COLOURS.items() for w in (c[0], c[1][1])] + list(world.SHAPES) + \
        list(world.SHAPES.values()) + list(world.POSITIONS)
    fixed = [prompts.TEXT, prompts.IMAGE_PROMPT, prompts.STS, prompts.CIRR_QUERY, prompts.CIRR_CANDIDATE,
             prompts.FASHIONIQ_QUERY, prompts.FASHIONIQ_CANDIDATE, PARAPHRASE, EDIT, *DESCRIBE,
             "make the turn the into a move the to the", "What colour is the What shape is Where is the",
             "user assistant"]
    return lines * 2 + words * 8 + fixed * 8


def build(out: Path, seed: int = 0) -> None:
    """Random-weight model, tokenizer and processor, saved with ``save_pretrained`` (the starting point)."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ..tiny import LLAMA3_STYLE, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(LLAMA3_STYLE, image_token="<image>", vocab_size=640, corpus=corpus(seed))
    side, patch = world.SIZE, 16
    vision = CLIPVisionConfig(image_size=side, patch_size=patch, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_grid_pinpoints=[[side, side]],
                             image_seq_length=(side // patch) ** 2, tie_word_embeddings=True,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=[[side, side]], size={"shortest_edge": side},
                                                   crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAMA3_STYLE.chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)


# --- stages A and B -------------------------------------------------------------------------------------------
def chat(inner: str) -> str:
    return prompts.LLAMA3_CHAT.format(inner)


def text_example(scene: world.Scene, rng: random.Random) -> tuple[str | None, str]:
    """(prompt, answer) of stage A; a ``None`` prompt is plain language modelling of the answer.

    Summaries name one of the scene's words, drawn at random: the best prediction is a spread over all of them,
    so the state before the answer has to hold the whole scene. Their prompt says "sentence", "text", "caption"
    or "description" ("sentence" is E5-V's own prompt); "image" is never among them."""
    r = rng.random()
    said = world.caption(scene, rng)
    if r < 0.1:
        return None, world.caption(scene, rng, rich=rng.random() < 0.5)
    if r < 0.2:
        return chat(prompts.fill(PARAPHRASE, said)), world.caption(scene, rng)
    if r < 0.3:
        new, ask = world.changed(scene, rng)
        return chat(prompts.fill(EDIT, said).replace("<edit>", ask)), world.caption(new, rng)
    if r < 0.5:
        asked, answer = world.question(scene, rng)
        return chat(f"{said}\n{asked}"), answer
    summary = prompts.TEXT.replace("sentence", rng.choice(SUMMARY_NOUNS))
    return chat(prompts.fill(summary, said)), rng.choice(scene.words)


def image_example(scene: world.Scene, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of stage B; the prompt's picture is ``scene``.

    Captions, edits and one-word answers to questions, as in stage A: with captions only, the picture itself
    would learn to mean "write a caption", whatever the instruction after it."""
    r = rng.random()
    if r < 0.15:
        new, ask = world.changed(scene, rng)
        return chat(IMAGE_EDIT.replace("<edit>", ask)), world.caption(new, rng)
    if r < 0.7:
        asked, answer = world.question(scene, rng)
        return chat(f"<image>\n{asked}"), answer
    return chat(rng.choice(DESCRIBE)), world.caption(scene, rng)


class ExampleBatcher:
    """Token ids, labels (-100 on prompts and padding) and image tensors of training examples.

    Every step draws new scenes, so the pictures are made here directly: the processor's output for a toy picture
    is the normalised picture, once as the base tile and once as the single grid tile, and its token ids are the
    prompt's with ``<image>`` repeated once per image feature. The constructor checks both against the processor
    itself."""

    def __init__(self, model_dir: Path):
        import numpy as np

        from ..encoder import E5V

        self.engine = E5V.from_pretrained(str(model_dir), device="cpu", dtype="float32")
        bb = self.engine.backbone
        self.tok, self.pad = bb.tokenizer, bb.pad_token_id
        self.eot = self.tok.convert_tokens_to_ids("<|eot_id|>")
        ip = bb.image_processor
        self.mean, self.std = (np.array(v, dtype=np.float32) for v in (ip.image_mean, ip.image_std))
        probe = world.scenes("held-out", 3)
        want = [bb.prepare(bb.render("<image>"), world.render(s)) for s in probe]
        self.image_tokens = int((want[0].input_ids == bb.processor.image_token_id).sum())
        if self.head(bb.render("<image>")) != want[0].input_ids.tolist() or not all(
                self.pixels([s])["pixel_values"].equal(w.images["pixel_values"]) for s, w in zip(probe, want)):
            raise RuntimeError("the processor no longer turns a toy picture into what the recipe feeds the model")

    def pixels(self, scenes: list[world.Scene]) -> dict:
        import numpy as np
        import torch

        x = np.stack([np.asarray(world.render(s), dtype=np.float32) for s in scenes]) / 255
        x = torch.from_numpy((x - self.mean) / self.std).permute(0, 3, 1, 2)
        return {"pixel_values": torch.stack([x, x], 1), "image_sizes": torch.tensor([[world.SIZE] * 2] * len(scenes))}

    def ids(self, prompt: str | None, answer: str) -> tuple[list[int], list[int]]:
        body = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eot]
        if prompt is None:
            ids = [self.tok.bos_token_id] + body
            return ids, ids
        head = self.head(prompt)
        return head + body, [-100] * len(head) + body

    def head(self, prompt: str) -> list[int]:
        """The token ids of a rendered prompt (BOS added), each ``<image>`` expanded to its feature count."""
        return self.tok(prompt.replace("<image>", "<image>" * self.image_tokens))["input_ids"]

    def batch(self, rows: list[tuple[str | None, str]], images: list[world.Scene] | None = None) -> dict:
        import torch

        seqs = [self.ids(p, a) for p, a in rows]
        width = max(len(i) for i, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (i, lab) in enumerate(seqs):
            ids[r, width - len(i):] = torch.tensor(i)
            labels[r, width - len(i):] = torch.tensor(lab)
            mask[r, width - len(i):] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if images:
            out.update(self.pixels(images))
        return out


def training_data(recipe: Recipe, stage: str):
    """The batches of stage "A" (rows), "V" (scenes) or "B" ((rows, scenes)): every text and picture that stages
    A, V and B train on. Each stage has its own seeded stream, drawn without the model, so a test can scan it."""
    rng = random.Random(f"{stage}:{recipe.seed}")
    steps = {"A": recipe.a_steps, "V": recipe.v_steps, "B": recipe.b_steps}[stage]
    for _ in range(steps):
        scenes = [world.sample(rng) for _ in range(recipe.batch)]
        if stage == "A":
            yield [text_example(s, rng) for s in scenes]
        elif stage == "V":
            yield scenes
        else:
            yield [image_example(s, rng) for s in scenes], scenes


@contextmanager
def fixed_threads(n: int):
    """Run with ``n`` intra-op threads and deterministic kernels, then restore the caller's settings. CPU kernels
    split their sums by thread count (the vision tower's diverged with 1 thread against 2), so without this the
    weights would depend on the machine. The recipe uses one: on a busy machine a 2-thread step waits for
    whichever thread is descheduled (3.4 s against 1.0 s per stage-A step at load 6.5 on 2 cores)."""
    import torch

    old = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        torch.use_deterministic_algorithms(old[1])


def example_loss(model, batch: dict):
    """Cross-entropy averaged over each example's answer tokens, then over examples: a one-word summary weighs
    as much as a ten-word caption (a token average would let the long answers drown the summaries)."""
    import torch

    labels = batch.pop("labels")[:, 1:]
    logits = model(**batch).logits[:, :-1]
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100,
                                               reduction="none")
    counts = (labels != -100).sum(1).clamp(min=1)
    return (tokens.sum(1) / counts).mean()


def fit(model, params, steps: int, lr: float, step_loss, name: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step (logged every 10%)."""
    import torch

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        loss = step_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {name}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            recent = losses[-max(1, steps // 10):]
            log.info("stage %s step %d/%d loss %.4f (%.0f s)", name, step + 1, steps, sum(recent) / len(recent),
                     time.perf_counter() - t0)
    model.eval()
    return losses


def stage_v_loss(tower, head, pixels, scenes: list[world.Scene]):
    """Stage V's objective: for each of the five places, which shape (or none) and which colour (or none) is there."""
    import torch

    places, shapes, colours = list(world.POSITIONS), list(world.SHAPES), list(world.COLOURS)
    want = torch.zeros((len(scenes), len(places), 2), dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s.objects:
            want[i, places.index(o.position)] = torch.tensor([shapes.index(o.shape) + 1, colours.index(o.colour) + 1])
    feats = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]     # the patches the LM gets
    logits = head(feats.flatten(1)).view(len(scenes), len(places), -1)
    cut = len(shapes) + 1
    ce = torch.nn.functional.cross_entropy
    return ce(logits[..., :cut].flatten(0, 1), want[..., 0].flatten()) + \
        ce(logits[..., cut:].flatten(0, 1), want[..., 1].flatten())


def save(model, start: Path, out: Path) -> None:
    """A loadable checkpoint: the model's weights and config, with the tokenizer and processor files of ``start``."""
    model.save_pretrained(out)
    for f in start.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "processor", "preprocessor")):
            shutil.copy2(f, out)


def stage_a_b(recipe: Recipe, start: Path, out: Path, keep: Path | None = None) -> dict:
    """Train stages A, V and B from the checkpoint in ``start`` and save the result in ``out`` (and the model
    after stage A in ``keep``)."""
    import torch

    batcher = ExampleBatcher(start)
    model = batcher.engine.backbone.model
    model.requires_grad_(False)
    torch.manual_seed(recipe.seed)
    text, seen, pictured = (training_data(recipe, stage) for stage in "AVB")

    lm = model.model.language_model
    lm.requires_grad_(True)
    loss_a = fit(model, lm.parameters(), recipe.a_steps, recipe.a_lr,
                 lambda: example_loss(model, batcher.batch(next(text))), "A")
    lm.requires_grad_(False)
    if keep:
        save(model, start, keep)

    # Stage V: the vision tower learns to see (LLaVA starts from a pretrained CLIP tower); its head is dropped.
    tower = model.model.vision_tower
    tower.requires_grad_(True)
    side = world.SIZE // model.config.vision_config.patch_size
    head = torch.nn.Linear(side * side * model.config.vision_config.hidden_size,
                           len(world.POSITIONS) * (len(world.SHAPES) + len(world.COLOURS) + 2))

    def vision_loss():
        scenes = next(seen)
        return stage_v_loss(tower, head, batcher.pixels(scenes)["pixel_values"][:, 0], scenes)

    loss_v = fit(model, [*tower.parameters(), *head.parameters()], recipe.v_steps, recipe.v_lr, vision_loss, "V")

    def image_loss():
        rows, scenes = next(pictured)
        return example_loss(model, batcher.batch(rows, scenes))

    vision = [tower, model.model.multi_modal_projector]
    for part in vision:
        part.requires_grad_(True)
    model.model.image_newline.requires_grad_(True)
    params = [p for part in vision for p in part.parameters()] + [model.model.image_newline]
    loss_b = fit(model, params, recipe.b_steps, recipe.b_lr, image_loss, "B")
    save(model, start, out)
    return {f"stage_{name}_loss": [losses[0], sum(losses[-20:]) / len(losses[-20:])]
            for name, losses in (("a", loss_a), ("v", loss_v), ("b", loss_b))}


# --- stage C ----------------------------------------------------------------------------------------------------
def triplets(n: int, seed: int, shuffled: bool = False) -> list[tuple[str, str, str]]:
    """Toy NLI: (anchor, paraphrase, hard negative). The negative has the anchor's wording and one attribute changed;
    anchor and paraphrase are in random registers, so the pair often crosses from plain to rich words.

    ``shuffled``: the control, with the positives and the hard negatives permuted across rows (each its own
    permutation): the same sentences and the same contrastive training, with no meaning in the pairs."""
    rng = random.Random(f"nli:{seed}")
    rows = []
    for scene in world.scenes("train", n, seed=seed + 1):
        rich, form, k = rng.random() < 0.5, rng.randrange(5), rng.randrange(1 << 30)
        anchor = world.caption(scene, random.Random(k), rich=rich, form=form)
        other, _ = world.changed(scene, rng)
        negative = world.caption(other, random.Random(k), rich=rich, form=form)
        positive = world.caption(scene, rng, rich=rng.random() < 0.5)
        rows.append((anchor, positive, negative))
    return shuffle_pairs(rows, seed) if shuffled else rows


def shuffle_pairs(rows: list[tuple], seed: int) -> list[tuple]:
    """The control of (query, positive, negative) rows: the positives and the negatives each permuted across rows
    by its own seeded permutation; the queries stay."""
    mix = random.Random(f"shuffle:{seed}")
    positives, negatives = [r[1] for r in rows], [r[2] for r in rows]
    mix.shuffle(positives)
    mix.shuffle(negatives)
    return [(r[0], p, q) for r, p, q in zip(rows, positives, negatives)]


def write_triplets(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """``rows`` as the SimCSE NLI CSV that ``e5v train`` reads (sent0, sent1, hard_neg)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent0", "sent1", "hard_neg"])
        w.writerows(rows)
    return path


def stage_c(recipe: Recipe, base: Path, work: Path, out: Path | None = None, data: str = "", **settings) -> dict:
    """Write the toy NLI triplets, train on them with :func:`e5v.train.train` (the adapter lands in
    ``work/stage-c/adapter``) and :func:`e5v.train.merge.merge` the adapter into ``out`` (unless ``out`` is
    None). ``data``: other training files instead (comma-separated, as ``e5v train --data`` takes them);
    ``settings``: more training settings (:class:`e5v.train.TrainConfig` fields)."""
    from ..train import make_config, train
    from ..train.merge import merge

    work.mkdir(parents=True, exist_ok=True)
    if not data:
        data = str(write_triplets(work / "toy-nli.csv", triplets(recipe.c_triplets, recipe.c_seed, recipe.c_shuffle)))
    run = work / "stage-c"
    config = make_config(model=str(base), data=data, output_dir=str(run), batch_size=recipe.c_batch,
                         micro_batch_size=3 * recipe.c_batch, max_steps=recipe.c_steps, learning_rate=recipe.c_lr,
                         warmup_steps=recipe.c_warmup, lora_r=recipe.c_lora_r, lora_alpha=recipe.c_lora_alpha,
                         dtype="float32", device="cpu", save_steps=recipe.c_steps, seed=recipe.c_seed,
                         gradient_checkpointing=False, progress=False, tensorboard=False, **settings)
    with fixed_threads(recipe.threads):
        adapter = train(config)
    log.info("stage C: adapter -> %s", adapter)
    if out is not None:
        merge(str(base), str(adapter), out, dtype="float32")
        log.info("stage C: merged into %s", out)
    losses = logged_losses(run / "log.jsonl")
    return {"stage_c_loss": [losses[0], losses[-1]], "stage_c_final_loss": final_loss(losses)}


def logged_losses(path: Path) -> list[float]:
    """The training loss of every step in a training log (``log.jsonl``), in order."""
    return [r["loss"] for r in map(json.loads, Path(path).read_text().splitlines()) if "loss" in r]


def final_loss(losses: list[float], last: int = 5) -> float:
    """The mean of the ``last`` steps' losses: each step's loss is one batch's, too noisy alone."""
    return sum(losses[-last:]) / len(losses[-last:])


def rebuild(out, recipe: Recipe | None = None, work=None, base=None) -> dict:
    """Run the whole recipe into ``out`` (a new directory); ``work`` keeps the stage checkpoints (``work/stage-ab``
    is the model before stage C). With ``base`` (a model before stage C, e.g. ``MINI_BEFORE_C``), run stage C only."""
    import tempfile

    out, recipe = Path(out), recipe or Recipe()
    with tempfile.TemporaryDirectory() as tmp, fixed_threads(recipe.threads):
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        report = {"recipe": asdict(recipe)}
        if base is None:
            build(work / "init", recipe.seed)
            report.update(stage_a_b(recipe, work / "init", work / "stage-ab", work / "stage-a"))
            report["stage_ab_s"] = round(time.perf_counter() - t0, 1)
            base = work / "stage-ab"
        else:
            report["base"] = str(base)
        report.update(stage_c(recipe, Path(base), work, out))
        report["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "recipe.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def setting(recipe: Recipe, kv: str) -> Recipe:
    """``recipe`` with one ``KEY=VALUE`` changed (the value in the setting's type; booleans as true/false)."""
    key, value = kv.split("=", 1)
    kind = type(getattr(recipe, key))
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} takes true or false, not {value!r}")
        return replace(recipe, **{key: value.lower() in ("true", "1")})
    return replace(recipe, **{key: kind(value)})


def main(argv=None) -> None:
    """``python -m e5v.toyworld.recipe OUT``: rebuild the mini model into OUT."""
    parser = argparse.ArgumentParser(prog="python -m e5v.toyworld.recipe", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true", help="a shortened recipe (seconds; for tests)")
    parser.add_argument("--work", type=Path, help="keep the stage checkpoints here")
    parser.add_argument("--base", type=Path, help="run stage C only, from this model before stage C "
                                                  "(e.g. the shipped mini-before-c)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a recipe setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = QUICK if args.quick else Recipe()
    for kv in args.set:
        recipe = setting(recipe, kv)
    print(json.dumps(rebuild(args.out, recipe, args.work, args.base), indent=2))


if __name__ == "__main__":
    main()
