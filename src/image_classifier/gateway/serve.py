"""``image-classifier serve``: the whole service in one command, on the embedded model server.

1. Start ``python -m image_classifier.model_server`` (TF-Serving-compatible REST) on the export,
   as a child process, and wait until it reports the model AVAILABLE.
2. Run the gateway (tfserving backend, pointed at that child) in this process.
3. Print where everything is. Keep the child alive: if it dies it is restarted (with backoff)
   while the gateway answers 503 in the meantime, then 200 again without a gateway restart.
4. On Ctrl-C or SIGTERM: stop accepting requests, let in-flight ones finish, then stop the
   child (SIGTERM, then SIGKILL after a grace period). Nothing is left running.

The child runs in its own session, so a terminal's Ctrl-C reaches only this process and the
shutdown order above holds; on Linux it is also told to exit if this process dies abruptly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from image_classifier.errors import ImageClassifierError, ModelNotFoundError
from image_classifier.gateway.commands import add_serve_arguments
from image_classifier.gateway.settings import GatewaySettings, SettingsError, load_settings

logger = logging.getLogger("image_classifier.gateway.serve")

_STOP_GRACE_S = 10.0
_MAX_BACKOFF_S = 30.0
_HEALTHY_AFTER_S = 60.0  # up this long: the next crash starts again from the shortest backoff


class ServeError(ImageClassifierError):
    """The service could not be started (port taken, model server failed to come up...)."""

    code = "serve_error"


class _Stop(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


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
        restart: bool = True,
        python: str = sys.executable,
        log_level: str = "info",
    ) -> None:
        self.model_base_path = model_base_path
        self.model_name = model_name
        self.port = port
        self.restart = restart
        self.python = python
        self.log_level = log_level
        self.url = f"http://127.0.0.1:{port}"
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
            "image_classifier.model_server",
            "--host",
            "127.0.0.1",
            "--rest_api_port",
            str(self.port),
            "--model_name",
            self.model_name,
            "--model_base_path",
            str(self.model_base_path),
            "--log_level",
            self.log_level,
        ]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_exit_with_parent if sys.platform == "linux" else None,
            )
        logger.info("model server started (pid %d): %s", self.process.pid, " ".join(self.command))

    def model_state(self, client: httpx.Client) -> tuple[str | None, str]:
        """(state, load error) from the status endpoint; (None, "") while it does not answer."""
        try:
            body = client.get(f"{self.url}/v1/models/{self.model_name}").json()
        except (httpx.HTTPError, ValueError):
            return None, ""
        entries = body.get("model_version_status", []) if isinstance(body, dict) else []
        entries = [e for e in entries if isinstance(e, dict)]
        if any(e.get("state") == "AVAILABLE" for e in entries):
            return "AVAILABLE", ""
        for entry in entries:
            status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
            if status.get("error_code", "OK") not in ("OK", 0):
                return entry.get("state"), str(status.get("error_message") or status)
        return (entries[0].get("state") if entries else None), ""

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
                if state == "AVAILABLE":
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


def _check_port_free(host: str, port: int, what: str) -> None:
    bind_host = "" if host in ("0.0.0.0", "::") else host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind_host, port))
        except OSError as exc:
            raise ServeError(
                f"{what} port {port} on {host or 'all interfaces'} is not free ({exc.strerror}); "
                f"pick another with --{'port' if what == 'gateway' else 'model-port'}"
            ) from None


def _display_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host


def _banner(settings: GatewaySettings, model: ModelServerProcess) -> str:
    base = f"http://{_display_host(settings.host)}:{settings.port}"
    return "\n".join(
        [
            "",
            f"  Web page:      {base}/",
            f"  API docs:      {base}/docs",
            f"  Readiness:     {base}/ready     Metrics: {base}/metrics",
            f"  Model server:  {model.url}/v1/models/{model.model_name}  (pid {model.pid})",
            "  Press Ctrl-C to stop both.",
            "",
        ]
    )


def serve_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``image-classifier serve``: a Namespace from the CLI's subparser, or raw argv."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(
            prog="image-classifier serve",
            description="Start the embedded model server and the gateway; Ctrl-C stops both.",
        )
        add_serve_arguments(parser)
        args = parser.parse_args(args)

    from image_classifier.gateway.run import LOG_FORMAT, build_server

    logging.basicConfig(
        level=args.log_level.upper(), format=LOG_FORMAT.replace(" [%(request_id)s]", "")
    )
    base_path = Path(args.model_base_path)
    try:
        from image_classifier.servable import resolve_version_dir

        version_dir = resolve_version_dir(base_path)
        _check_port_free(args.host, args.port, "gateway")
        _check_port_free("127.0.0.1", args.model_port, "model server")
        settings = load_settings(
            host=args.host,
            port=args.port,
            backend="tfserving",
            tf_serving_url=f"http://127.0.0.1:{args.model_port}",
            model_name=args.model_name,
            model_card_path=base_path,
            log_level=args.log_level,
        )
    except ModelNotFoundError as exc:
        print(
            f"error: {exc}\nTrain and export a model first (`image-classifier train`), or "
            "point --model-base-path at an export.",
            file=sys.stderr,
        )
        return 2
    except (ServeError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    model = ModelServerProcess(
        model_base_path=base_path,
        model_name=args.model_name,
        port=args.model_port,
        restart=not args.no_restart,
        log_level=args.log_level,
    )
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> Any:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"Starting the model server for {version_dir} on port {args.model_port}...", flush=True)
    try:
        model.spawn()
        model.wait_until_available(args.startup_timeout)
        model.start_watchdog()
        server = build_server(settings)
        original_startup = server.startup

        async def startup_then_banner(sockets: Any = None) -> None:
            await original_startup(sockets=sockets)
            if server.started:
                print(_banner(settings, model), flush=True)

        server.startup = startup_then_banner  # type: ignore[method-assign]
        server.run()
        return 0 if server.started else 1
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt, _Stop):
            print("Stopping...", flush=True)
            model.stop()
            print("Stopped.", flush=True)
        signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
