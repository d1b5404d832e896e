"""The toy world (``world``), the recipe that trains the bundled mini model on it (``recipe``), its retrieval
figures (``measure``) and ``e5v demo`` (``demo``).

``MINI`` is the bundled model's directory: ``E5V.from_pretrained(MINI)`` loads it like any checkpoint."""
from pathlib import Path

MINI = Path(__file__).parent / "mini"
