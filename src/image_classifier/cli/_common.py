"""What every command module of the CLI shares: the subparsers type and small argument types."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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


# What TensorFlow's shared libraries print to stderr while they load, whatever
# TF_CPP_MIN_LOG_LEVEL says (the C++ logger is not configured yet): an absl notice, the oneDNN
# notice (once per library that links oneDNN) and the CPU-features notice.
_LOAD_BANNERS = (
    "WARNING: All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
)


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
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401 - imported for its side effect: loaded once, quietly
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not any(banner in line for banner in _LOAD_BANNERS):
                    sys.stderr.write(line)
            sys.stderr.flush()
