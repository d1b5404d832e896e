"""The ``e5v`` command: one program, one verb per job, one module per verb in this package. Each long job shows
progress, resumes after an interruption, and ends with a summary line. Exit status: 0 done, 1 error, 2 usage,
3 done with skipped items (:mod:`e5v.cli.common`). Every error ends with one line on stderr, never a traceback
(``--debug`` shows it)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .common import EXIT_ERROR

log = logging.getLogger("e5v")

#: The verbs' modules, in the order of ``e5v --help``: each has ``add_parsers(sub)`` and imports nothing heavy
#: at module level (the parser is built on every call, so ``e5v --help`` stays fast).
VERB_MODULES: tuple[str, ...] = ("e5v.cli.embed", "e5v.cli.demo", "e5v.cli.serve", "e5v.cli.index", "e5v.cli.train",
                                 "e5v.cli.bench", "e5v.cli.eval")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="e5v", description="E5-V universal multimodal embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def describe_error(err: BaseException) -> str:
    """One line for an error e5v did not raise on purpose (disk full, permission denied, a library's bug)."""
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else str(f)
                            for f in (err.filename, err.filename2) if f is not None)
        return f"{err.strerror}{f': {where}' if where else ''}"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}{f': {first}' if first else ''} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 in a message must not end the run
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from ..errors import E5VError

    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at exit
        return status
    except KeyboardInterrupt:
        print(f"e5v {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went into `head` & co., which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as err:  # noqa: BLE001 -- every error ends with one line and status 1, not a traceback
        if args.debug:
            traceback.print_exc()
        message = str(err) if isinstance(err, E5VError) else describe_error(err)
        print(f"e5v {args.verb}: error: {message}", file=sys.stderr)
        return EXIT_ERROR

