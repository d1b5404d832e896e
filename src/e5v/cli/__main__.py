"""``python -m e5v.cli VERB ...``: the ``e5v`` command, for launchers that take a module (torchrun, accelerate,
deepspeed)."""
import sys

from . import main

sys.exit(main())
