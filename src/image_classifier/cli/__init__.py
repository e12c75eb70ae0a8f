"""``image-classifier``: the command line, thin wrappers over the library functions.

One module per command, all registered the same way: ``register(subparsers)`` adds the command's
parser and sets ``func=run``, and ``run(args) -> exit status`` calls the library. Modules import
only argparse and the package's constants at registration, so ``image-classifier --help`` and
``train`` work on a machine without the web stack; each command imports what it needs when it
runs. Errors are turned into one line and an exit status here, in :func:`main`, and nowhere else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from image_classifier import __version__
from image_classifier.cli import (
    evaluate,
    export,
    gateway,
    make_request,
    model_server,
    predict,
    serve,
    train,
)
from image_classifier.constants import MODEL_NAME
from image_classifier.errors import ImageClassifierError

__all__ = ["build_parser", "main"]

# In the order `--help` lists them: the model's life, then serving it, then calling it.
COMMANDS = (train, evaluate, export, model_server, make_request, gateway, serve, predict)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-classifier",
        description=f"Train, export, serve and call the {MODEL_NAME} CIFAR-10 TCN classifier.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ImageClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # A file the user named cannot be read or written: their mistake, not a crash.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
