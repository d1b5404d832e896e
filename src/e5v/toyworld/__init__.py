"""The toy world (``world``), the recipe that trains the bundled mini model on it (``recipe``), its retrieval
figures (``measure``), ``e5v demo`` (``demo``) and the experiments on it (``claim2``, ``modalities``, run by
``experiment``).

``MINI`` is the bundled model's directory: ``E5V.from_pretrained(MINI)`` loads it like any checkpoint.
``MINI_BEFORE_C`` is the same model before stage C (so anyone can check claim 2), and ``MINI_SHUFFLED`` the LoRA
adapter of stage C on shuffled pairs (the control): ``E5V.from_pretrained(MINI_BEFORE_C, adapter=MINI_SHUFFLED)``."""
from pathlib import Path

MINI = Path(__file__).parent / "mini"
MINI_BEFORE_C = Path(__file__).parent / "mini-before-c"
MINI_SHUFFLED = Path(__file__).parent / "mini-shuffled-adapter"
