"""benchmarks/train_step.py runs (tiny config on CPU): both text paths, same batch; the image mode."""
from __future__ import annotations

import importlib.util

from support import ROOT


def test_train_step_benchmark_runs_tiny():
    path = ROOT / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--triplets", "4", "--chunk", "5",
                    "--lora-r", "8", "--steps", "1", "--warmup", "0"])
    plain, e5v = res
    assert (plain["chunks"], e5v["chunks"]) == (1, 3) and plain["checkpointing"] and not e5v["checkpointing"]
    assert plain["sentences_per_s"] > 0 and e5v["sentences_per_s"] > 0


def test_train_step_benchmark_image_mode_runs(tiny_dirs, monkeypatch):
    """--images: image-caption pairs through the whole model (a checkpoint here), the vision side trained too. The
    images are the engine's (its token count for them), chunks are cut by the token budget as training cuts them,
    and each timed step includes the preparation of its batch (made 0.3 s slower here: every step is)."""
    import time

    from e5v import E5V, prompts
    from e5v.bench.inputs import make_images
    from e5v.items import Item
    from e5v.train.embed import EngineSentences
    from e5v.train.gradcache import plan_chunks

    inputs = EngineSentences.inputs

    def slow_inputs(self, rows):
        time.sleep(0.3)
        return inputs(self, rows)

    monkeypatch.setattr(EngineSentences, "inputs", slow_inputs)

    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = str(tiny_dirs["e5v-like"])
    (res,) = mod.main(["--images", "--model", path, "--device", "cpu", "--dtype", "float32", "--triplets", "3",
                       "--chunk", "6", "--chunk-tokens", "200", "--steps", "2", "--warmup", "0", "--lora-r", "4",
                       "--train-projector", "--vision-lora"])
    assert (res["path"], res["pairs"], res["trained"]) == ("images", 3, "lm-lora+projector+vision-lora")
    engine = E5V.from_pretrained(path)
    image_lengths = [len(engine.prepare(Item(image=b), prompts.IMAGE_PROMPT)) for b in make_images(3)]
    assert res["image_tokens"] == round(sum(image_lengths) / 3) > res["caption_tokens"]
    lengths = image_lengths + [res["caption_tokens"]] * 3  # captions differ by a few tokens: not a chunk boundary
    assert res["chunks"] == len(plan_chunks(lengths, 6, True, 200)) > len(plan_chunks(lengths, 6, True)) == 1
    assert 0.3 < res["prepare_s"] < res["step_s"]  # preparation is part of each timed step
    assert abs(res["sentences_per_s"] - 6 / res["step_s"]) < 0.01 * res["sentences_per_s"] + 0.02
    assert res["images_per_s"] > 0 and res["peak_rss_gib"] > 0
