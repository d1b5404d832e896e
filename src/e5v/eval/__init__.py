"""Evaluation on the paper's benchmarks (``e5v eval``) and an MTEB/MIEB encoder wrapper (:mod:`e5v.eval.mteb`)."""
