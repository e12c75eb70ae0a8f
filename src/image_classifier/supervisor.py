"""Runs the embedded model server as a child process for ``image-classifier serve``.

:class:`ModelServerProcess` starts ``python -m image_classifier model-server`` on the export,
waits until it reports the model AVAILABLE, watches it from a thread and restarts it (with
backoff) if it dies, and stops it on request (SIGTERM, then SIGKILL after a grace period).

The child runs in its own session, so a terminal's Ctrl-C reaches only the parent, which stops
the gateway first and the child after; on Linux the child is also told to exit if the parent
dies abruptly, so nothing is left running.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from image_classifier.constants import DEFAULT_GRPC_PORT, DEFAULT_HOST, LogLevel
from image_classifier.errors import ServeError
from image_classifier.tfserving.rest import model_path
from image_classifier.tfserving.status import AVAILABLE, parse_status_body

logger = logging.getLogger("image_classifier.supervisor")

_STOP_GRACE_S = 10.0
_MAX_BACKOFF_S = 30.0
_HEALTHY_AFTER_S = 60.0  # up this long: the next crash starts again from the shortest backoff


def _exit_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it if we die first
    # (PR_SET_PDEATHSIG = 1), so a SIGKILLed `serve` leaves no orphan model server.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ModelServerProcess:
    """The embedded model server child: start, wait until AVAILABLE, watch, restart, stop."""

    def __init__(
        self,
        *,
        model_base_path: Path,
        model_name: str,
        port: int,
        grpc_port: int = DEFAULT_GRPC_PORT,
        restart: bool = True,
        python: str = sys.executable,
        log_level: LogLevel = "info",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_base_path = model_base_path
        self.model_name = model_name
        self.port = port
        self.grpc_port = grpc_port
        self.restart = restart
        self.python = python
        self.log_level = log_level
        self.extra_args = extra_args
        self.url = f"http://{DEFAULT_HOST}:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None

    @property
    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "image_classifier",
            "model-server",
            "--host",
            DEFAULT_HOST,
            "--rest_api_port",
            str(self.port),
            "--port",
            str(self.grpc_port),
            "--model_name",
            self.model_name,
            "--model_base_path",
            str(self.model_base_path),
            "--log_level",
            self.log_level,
            *self.extra_args,
        ]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            env = dict(os.environ)
            if self.log_level != "debug":
                # TensorFlow's C++ INFO banners (oneDNN, CPU features) are noise at start-up.
                env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
            self.process = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_exit_with_parent if sys.platform == "linux" else None,
            )
        logger.info("model server started (pid %d): %s", self.process.pid, " ".join(self.command))

    def model_state(self, client: httpx.Client) -> tuple[str | None, str]:
        """(state, load error) from the status endpoint; (None, "") while it does not answer."""
        try:
            body = client.get(f"{self.url}{model_path(self.model_name)}").json()
        except (httpx.HTTPError, ValueError):
            return None, ""
        statuses = parse_status_body(body)
        if any(s.state == AVAILABLE for s in statuses):
            return AVAILABLE, ""
        for status in statuses:
            if status.failed:
                return status.state, status.error_message or status.error_code
        return (statuses[0].state if statuses else None), ""

    def wait_until_available(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                process = self.process
                if process is not None and process.poll() is not None:
                    raise ServeError(
                        f"the model server exited with status {process.returncode} before the "
                        "model became AVAILABLE (its log is above)"
                    )
                state, error = self.model_state(client)
                if state == AVAILABLE:
                    return
                if error:
                    # The server would retry the load for minutes; the export is what to fix.
                    raise ServeError(f"the model server could not load the model: {error}")
                if time.monotonic() > deadline:
                    raise ServeError(
                        f"the model server did not report {self.model_name!r} AVAILABLE "
                        f"within {timeout_s:g}s"
                    )
                time.sleep(0.2)

    def start_watchdog(self) -> None:
        self._watchdog = threading.Thread(
            target=self._watch, name="model-server-watchdog", daemon=True
        )
        self._watchdog.start()

    def _watch(self) -> None:
        backoff = 1.0
        started = time.monotonic()
        while not self._stopping.wait(0.5):
            process = self.process
            if process is None or process.poll() is None:
                continue
            if self._stopping.is_set():
                return
            if not self.restart:
                logger.error(
                    "model server exited with status %s; not restarting (--no-restart): the "
                    "gateway answers 503 until it is back",
                    process.returncode,
                )
                return
            if time.monotonic() - started > _HEALTHY_AFTER_S:
                backoff = 1.0
            logger.warning(
                "model server exited with status %s; restarting in %.0fs (the gateway answers "
                "503 meanwhile)",
                process.returncode,
                backoff,
            )
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
            self.restarts += 1
            started = time.monotonic()
            try:
                self.spawn()
            except OSError as exc:
                logger.error("could not restart the model server: %s", exc)
            else:
                logger.warning("model server restarted (pid %s)", self.pid)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            logger.info("stopping the model server (pid %d)", process.pid)
            process.terminate()
            try:
                process.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("model server ignored SIGTERM for %.0fs; killing it", _STOP_GRACE_S)
                process.kill()
                process.wait()
        if self._watchdog is not None:
            self._watchdog.join(timeout=2.0)


def check_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise :class:`ServeError` naming ``flag`` if ``port`` cannot be bound on ``host``."""
    bind_host = "" if host in ("0.0.0.0", "::") else host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind_host, port))
        except OSError as exc:
            raise ServeError(
                f"{what} port {port} on {host or 'all interfaces'} is not free ({exc.strerror}); "
                f"pick another with {flag}"
            ) from None
