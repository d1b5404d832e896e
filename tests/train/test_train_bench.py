"""benchmarks/train_step.py runs (tiny config on CPU): both paths, same batch, finite and equal losses."""
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
