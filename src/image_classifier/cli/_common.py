"""What every command module of the CLI shares: the subparsers type and small argument types."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TypeAlias

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def int_tuple(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; an empty string is the empty tuple."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def flag_bool(text: str) -> bool:
    """TF Serving's boolean flag values: ``--flag``, ``--flag=true`` or ``--flag=false``."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def quiet_tensorflow(log_level: str | None) -> None:
    """Import TensorFlow now, without its load-time banners on stderr, unless debugging.

    Those banners print twice on every start of a server and say nothing an operator can act on.
    stderr (the file descriptor, since C++ writes there) is captured during the import and
    everything else that was written is passed on, so a real import error still shows. Later
    C++ INFO lines are hidden with TF_CPP_MIN_LOG_LEVEL=1; a value the user set wins.
    """
    if (log_level or "info") == "debug":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if "tensorflow" in sys.modules:
        return
    from image_classifier.tfnotices import LOAD_BANNERS, stderr_without

    with stderr_without(LOAD_BANNERS):
        import tensorflow  # noqa: F401 - imported for its side effect: loaded once, quietly
