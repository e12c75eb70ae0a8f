"""TensorFlow's C++ notices on stderr that say nothing an operator can act on, kept off it.

C++ writes to the file descriptor, not to ``sys.stderr``, and some of these lines print
whatever ``TF_CPP_MIN_LOG_LEVEL`` says, so the only way to drop them is to capture fd 2 while
the code that prints them runs and pass every other line on (a real error still shows).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# What TensorFlow's shared libraries print while they load (the C++ logger is not configured
# yet): an absl notice, the oneDNN notice (once per library that links oneDNN) and the
# CPU-features notice.
LOAD_BANNERS = (
    "WARNING: All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
)
# Logged at ERROR level by the first float16 op of a process on a CPU without AVX-512 FP16
# (exports store their weights as float16): oneDNN leaves such ops to Eigen, which is how they
# run there anyway.
FLOAT16_NOTICE = "oneDNN supports DT_HALF only on platforms with AVX-512"

_float16_lock = threading.Lock()
_float16_done = False


@contextmanager
def stderr_without(notices: tuple[str, ...]) -> Iterator[None]:
    """Run the body with fd 2 captured; afterwards write back every line but ``notices``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not any(notice in line for notice in notices):
                    sys.stderr.write(line)
            sys.stderr.flush()


def float16_notice_said_quietly() -> None:
    """Run a first float16 op (once per process) with :data:`FLOAT16_NOTICE` kept off stderr.

    TensorFlow prints that notice once, at the first float16 op; doing it here, before a model
    loads, keeps it out of every later load. Call it only after the process has set its
    TensorFlow thread counts: running an op fixes them.
    """
    global _float16_done
    with _float16_lock:
        if _float16_done:
            return
        import tensorflow as tf

        with stderr_without((FLOAT16_NOTICE,)):
            tf.cast(tf.zeros([1], tf.float16), tf.float32)
        _float16_done = True
