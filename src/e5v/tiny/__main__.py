"""``python -m e5v.tiny FAMILY OUT_DIR [--seed N]``."""
from . import main

main()
