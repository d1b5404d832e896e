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


def test_train_step_benchmark_image_mode_runs(tiny_dirs):
    """--images: image-caption pairs through the whole model (a checkpoint here), the vision side trained too."""
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (res,) = mod.main(["--images", "--model", str(tiny_dirs["e5v-like"]), "--device", "cpu", "--dtype", "float32",
                       "--triplets", "3", "--chunk", "2", "--steps", "1", "--warmup", "0", "--lora-r", "4",
                       "--train-projector", "--vision-lora"])
    assert (res["path"], res["pairs"], res["chunks"]) == ("images", 3, 3)
    assert res["trained"] == "lm-lora+projector+vision-lora"
    assert res["image_tokens"] > res["caption_tokens"] and res["images_per_s"] > 0 and res["peak_rss_gib"] > 0
    assert abs(res["sentences_per_s"] - 2 * res["images_per_s"]) < 0.02
