"""Soak test: a steady mixed upload load for minutes, watching errors, latency and memory.

Against ``image-classifier serve`` started here on free ports (the default), or against a gateway
already running on this machine (``--url``; loopback only: this is a measuring tool, not
something to point at other people's servers)::

    # spawn `serve` with the shipped model, 10 minutes at 32 requests in flight
    python benchmarks/soak.py

    # shorter and lighter, with the results also written as JSON
    python benchmarks/soak.py --minutes 1 --concurrency 8 --json soak.json

    # a gateway that is already running (its process and model-server child found by port)
    python benchmarks/soak.py --url http://127.0.0.1:8000

``--concurrency`` workers upload closed-loop to ``POST /predict-image`` (each sends its next
picture when the previous answer is in), until ``--minutes`` have passed or ``--max-requests``
were sent. The pictures are a fixed mix made with Pillow and NumPy: CIFAR-size (32x32) PNGs and
JPEGs, 1280x960 JPEG "photos" (smooth gradients plus noise, about 280 kB), and a share
(``--bad-share``, 5%) of bad uploads: a truncated JPEG, bytes that are not an image, and a PNG
whose header declares more pixels than the gateway decodes. A bad upload answered 4xx is
expected and counted on its own; errors are 5xx answers, connection errors and timeouts, and
any other surprise (a 4xx for a good picture, a 200 for a bad one).

Every ``--report-seconds`` (60) and at the end it prints requests, requests/s, errors by
status, p50/p95/p99 latency of answered requests, and the resident memory (VmRSS from
``/proc/<pid>/status``, sampled every ``--sample-seconds``) of the gateway process (``serve``)
and its model-server child, with each one's RSS slope in MB per minute: a least-squares fit over
the second half of the run, so start-up and warm-up do not count as growth. A model server that
the watchdog restarted is reported, and its slope covers the newest process only.

The summary is a Markdown table on stdout; ``--json PATH`` writes everything, per-interval
reports and RSS samples included. Ctrl-C ends the load early and still reports. Exit status 0
when there were no errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MB = 1024 * 1024
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0


# --- the pictures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    kind: str  # what it is, for the report
    filename: str
    data: bytes
    content_type: str
    bad: bool  # expected to be refused with a 4xx


def _encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo(rng: np.random.Generator) -> Any:
    """A 1280x960 phone-like picture: smooth gradients plus sensor-like noise (about 280 kB as
    JPEG), so decoding and downscaling cost what a real upload costs."""
    from PIL import Image

    yy, xx = np.mgrid[0:960, 0:1280].astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi, size=3)
    pixels = np.stack(
        [
            127 + 100 * np.sin(xx / 200.0 + phase[0]),
            127 + 100 * np.cos(yy / 150.0 + phase[1]),
            127 + 100 * np.sin((xx + yy) / 300.0 + phase[2]),
        ],
        axis=-1,
    )
    pixels += rng.normal(0, 10, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_pictures(seed: int = 0) -> tuple[list[Picture], list[Picture]]:
    """(good, bad): a few of each kind, generated once."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    good: list[Picture] = []
    for index in range(4):
        tiny = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
        good.append(Picture("cifar-png", f"c{index}.png", _encode(tiny, "PNG"), "image/png", False))
        good.append(
            Picture(
                "cifar-jpeg",
                f"c{index}.jpg",
                _encode(tiny, "JPEG", quality=90),
                "image/jpeg",
                False,
            )
        )
    photos = [_encode(_photo(rng), "JPEG", quality=85) for _ in range(3)]
    good += [
        Picture("photo-jpeg", f"photo{i}.jpg", data, "image/jpeg", False)
        for i, data in enumerate(photos)
    ]
    # 8000x7000 = 56 MP of one-bit pixels: a few kB on the wire, over the 50 MP decode limit.
    oversize = _encode(Image.new("1", (8000, 7000)), "PNG")
    bad = [
        Picture("truncated-jpeg", "cut.jpg", photos[0][: len(photos[0]) // 2], "image/jpeg", True),
        Picture(
            "not-an-image",
            "notes.jpg",
            b"these are not the pixels you want\n" * 40,
            "image/jpeg",
            True,
        ),
        Picture("oversize-png", "huge.png", oversize, "image/png", True),
    ]
    return good, bad


def picture_for(
    good: Sequence[Picture], bad: Sequence[Picture], draw: random.Random, bad_share: float
) -> Picture:
    """Next upload: a bad one with probability ``bad_share``, else a good one, each of its
    kinds (CIFAR PNG, CIFAR JPEG, photo) equally often."""
    pool = bad if draw.random() < bad_share else good
    kind = draw.choice(sorted({p.kind for p in pool}))
    return draw.choice([p for p in pool if p.kind == kind])


# --- the service's processes ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MB, None if it is gone."""
    try:
        with Path(f"/proc/{pid}/status").open(encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """Child processes of ``pid``: /proc/<pid>/task/<tid>/children, over every thread (the
    model server is restarted from a watchdog thread, which then becomes its parent task)."""
    found: list[int] = []
    try:
        tasks = [task.name for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        found += [int(child) for child in text.split()]
    return found


def model_server_child(pid: int) -> int | None:
    for child in children(pid):
        if "model-server" in _cmdline(child):
            return child
    return None


def listening_pid(port: int) -> int | None:
    """The process with a socket listening on ``port`` (best effort, from /proc/net/tcp*)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # another user's process, or gone
        for fd in fds:
            try:
                if str(fd.readlink()) in inodes:
                    return int(entry.name)
            except OSError:
                continue
    return None


def _start_serve(model_base_path: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``serve`` on two free ports and wait until it is ready; (process, gateway URL).

    Ports are free when picked, but another program may take one before serve binds it; such
    a start is retried on new ports, a few times.
    """
    for attempt in range(1, 4):
        port, model_port = _free_port(), _free_port()
        command = [
            sys.executable, "-m", "image_classifier", "serve",
            "--port", str(port),
            "--model-port", str(model_port),
            "--model-base-path", model_base_path,
            "--log-level", "warning",
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches this script only, which then
            # stops the load and reports before it stops serve.
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while process.poll() is None:
            try:
                if httpx.get(f"{url}/ready", timeout=2, trust_env=False).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                _stop(process)
                waited = f"serve not ready within {STARTUP_TIMEOUT_S:g} s"
                raise SystemExit(f"{waited}:\n{_tail(log_path)}")
            time.sleep(0.3)
        log_text = log_path.read_text(errors="replace")
        if attempt < 3 and ("already in use" in log_text or "is not free" in log_text):
            continue
        raise SystemExit(f"serve exited with {process.returncode}:\n{_tail(log_path)}")
    raise AssertionError("unreachable")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # the same clean stop as Ctrl-C
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def spawned_serve(model_base_path: str, log_path: Path) -> Iterator[tuple[str, int]]:
    """``image-classifier serve`` on free ports; yields (gateway URL, serve's pid)."""
    process, url = _start_serve(model_base_path, log_path)
    try:
        yield url, process.pid
    finally:
        _stop(process)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def log_warnings(path: Path) -> list[str]:
    """Warning and error lines of serve's log (both processes log at --log-level warning), less
    TensorFlow's start-up notice about absl logging."""
    return [
        line
        for line in path.read_text(errors="replace").splitlines()
        if (" WARNING " in line or " ERROR " in line or " CRITICAL " in line or "Traceback" in line)
        and "absl::InitializeLog" not in line
    ]


# --- measuring -------------------------------------------------------------------------------


@dataclass
class RssSample:
    t_s: float  # since the load started
    process: str  # "gateway" or "model-server"
    pid: int
    rss_mb: float


@dataclass
class Tally:
    """Outcomes of a span of requests."""

    requests: int = 0
    ok: int = 0
    expected_4xx: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # answered requests only
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)  # kind -> status -> count

    def add(self, picture: Picture, status: int | None, error: str | None, latency: float) -> None:
        self.requests += 1
        self.by_kind.setdefault(picture.kind, Counter())[str(status or error)] += 1
        if status is not None:
            self.latencies_s.append(latency)
        if status == 200 and not picture.bad:
            self.ok += 1
        elif status is not None and picture.bad and 400 <= status < 500 and status != 408:
            self.expected_4xx += 1
        elif status is None:
            self.errors[error or "connection error"] += 1
        elif status >= 500:
            self.errors[str(status)] += 1
        else:  # a good picture refused, or a bad one accepted
            self.errors[f"{status} for {picture.kind}"] += 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    values = np.asarray(latencies_s) * 1000
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(values.max()),
    }


def rss_slope_mb_per_min(samples: Sequence[RssSample], run_s: float) -> float | None:
    """Least-squares slope over the second half of the run, newest process only."""
    if not samples:
        return None
    newest = samples[-1].pid
    late = [s for s in samples if s.pid == newest and s.t_s >= run_s / 2]
    if len(late) < 3:
        return None
    t = np.array([s.t_s / 60 for s in late])
    rss = np.array([s.rss_mb for s in late])
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, rss, 1)[0])


class Soak:
    def __init__(self, url: str, gateway_pid: int | None, args: argparse.Namespace) -> None:
        self.url = url
        self.gateway_pid = gateway_pid
        self.args = args
        self.good, self.bad = make_pictures()
        self.total = Tally()
        self.interval = Tally()
        self.samples: list[RssSample] = []
        self.model_pids: list[int] = []  # every model-server pid seen, in order
        self.reports: list[dict[str, Any]] = []
        self.started = 0.0
        self.last_report = 0.0
        self.deadline = 0.0
        self.elapsed = 0.0
        self.sent = 0

    # RSS ------------------------------------------------------------------------------------

    def sample_rss(self) -> None:
        now = time.monotonic() - self.started
        if self.gateway_pid is None:
            return
        rss = read_rss_mb(self.gateway_pid)
        if rss is not None:
            self.samples.append(RssSample(now, "gateway", self.gateway_pid, rss))
        child = model_server_child(self.gateway_pid)
        if child is not None:
            if not self.model_pids or self.model_pids[-1] != child:
                self.model_pids.append(child)
            rss = read_rss_mb(child)
            if rss is not None:
                self.samples.append(RssSample(now, "model-server", child, rss))

    def latest_rss(self, process: str) -> RssSample | None:
        return next((s for s in reversed(self.samples) if s.process == process), None)

    # load -----------------------------------------------------------------------------------

    async def _worker(self, client: httpx.AsyncClient, draw: random.Random) -> None:
        while time.monotonic() < self.deadline and self.sent < self.args.max_requests:
            self.sent += 1
            picture = picture_for(self.good, self.bad, draw, self.args.bad_share)
            files = {"file": (picture.filename, picture.data, picture.content_type)}
            status: int | None = None
            error: str | None = None
            started = time.perf_counter()
            try:
                response = await client.post("/predict-image", files=files)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            latency = time.perf_counter() - started
            self.total.add(picture, status, error, latency)
            self.interval.add(picture, status, error, latency)

    async def _sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample_rss()
            with suppress(asyncio.TimeoutError):  # not the builtin before Python 3.11
                await asyncio.wait_for(stop.wait(), self.args.sample_seconds)

    async def _reporter(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.args.report_seconds)
            except asyncio.TimeoutError:
                # At the deadline the run's own last report covers the rest (in-flight
                # requests included), rather than a separate sliver after this one.
                if time.monotonic() < self.deadline - 1:
                    self.report_interval()

    def _stop_early(self, loop: asyncio.AbstractEventLoop) -> None:
        """First Ctrl-C: stop sending, let requests in flight finish, report as usual. A second
        one interrupts (the handler is gone)."""
        print("Stopping early: waiting for the requests in flight...", flush=True)
        self.deadline = time.monotonic()
        loop.remove_signal_handler(signal.SIGINT)

    def report_interval(self) -> None:
        now = time.monotonic()
        elapsed, seconds = now - self.started, now - self.last_report
        self.last_report = now
        span, self.interval = self.interval, Tally()
        rss_mb = {
            name: sample.rss_mb
            for name in ("gateway", "model-server")
            if (sample := self.latest_rss(name)) is not None
        }
        report: dict[str, Any] = {
            "t_min": round(elapsed / 60, 2),
            "requests": span.requests,
            "rps": span.requests / seconds if seconds else math.nan,
            "ok": span.ok,
            "expected_4xx": span.expected_4xx,
            "errors": dict(span.errors),
            **percentiles_ms(span.latencies_s),
            "rss_mb": rss_mb,
        }
        self.reports.append(report)
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(span.errors.items())) or "none"
        rss = ", ".join(f"{k} {v:.0f} MB" for k, v in rss_mb.items()) or "n/a"
        clock = f"{int(elapsed // 60):02d}:{int(elapsed % 60):02d}"
        print(
            f"[{clock}] {span.requests} requests ({report['rps']:.1f}/s), "
            f"errors {span.error_count} ({errors}), expected 4xx {span.expected_4xx}, "
            f"p50/p95/p99 {report['p50_ms']:.0f}/{report['p95_ms']:.0f}/"
            f"{report['p99_ms']:.0f} ms, RSS {rss}",
            flush=True,
        )

    async def _user(self, draw: random.Random) -> None:
        # One client (one connection) per user: a single httpx pool shared by many concurrent
        # requests costs the client milliseconds of CPU per request and would soak the load
        # generator rather than the service.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False
        ) as client:
            await self._worker(client, draw)

    async def run(self) -> None:
        limits = httpx.Limits(
            max_connections=self.args.concurrency, max_keepalive_connections=self.args.concurrency
        )
        async with httpx.AsyncClient(
            base_url=self.url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False
        ) as client:
            ready = await client.get("/ready")
            if ready.status_code != 200:
                raise SystemExit(f"{self.url}/ready answered {ready.status_code}: {ready.text}")
            self.started = self.last_report = time.monotonic()
            self.deadline = self.started + self.args.minutes * 60
            stop = asyncio.Event()
            background = [
                asyncio.create_task(self._sampler(stop)),
                asyncio.create_task(self._reporter(stop)),
            ]
            seed = random.Random(self.args.seed)
            workers = [
                self._user(random.Random(seed.random())) for _ in range(self.args.concurrency)
            ]
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, self._stop_early, loop)
            try:
                await asyncio.gather(*workers)
            finally:
                loop.remove_signal_handler(signal.SIGINT)
            self.elapsed = time.monotonic() - self.started
            stop.set()
            await asyncio.gather(*background)
            self.sample_rss()
            if self.interval.requests:
                self.report_interval()

    # summary --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        processes = {}
        for name in ("gateway", "model-server"):
            series = [s for s in self.samples if s.process == name]
            if not series:
                continue
            processes[name] = {
                "pid": series[-1].pid,
                "rss_start_mb": series[0].rss_mb,
                "rss_end_mb": series[-1].rss_mb,
                "rss_max_mb": max(s.rss_mb for s in series),
                "rss_slope_mb_per_min": rss_slope_mb_per_min(series, self.elapsed),
            }
        return {
            "url": self.url,
            "minutes": self.elapsed / 60,
            "concurrency": self.args.concurrency,
            "requests": self.total.requests,
            "rps": self.total.requests / self.elapsed if self.elapsed else math.nan,
            "ok": self.total.ok,
            "expected_4xx": self.total.expected_4xx,
            "errors": self.total.error_count,
            "errors_by_status": dict(self.total.errors),
            "answers_by_kind": {kind: dict(c) for kind, c in sorted(self.total.by_kind.items())},
            **percentiles_ms(self.total.latencies_s),
            "processes": processes,
            "model_server_restarts": max(0, len(self.model_pids) - 1),
            "reports": self.reports,
            "rss_samples": [asdict(s) for s in self.samples],
        }


def markdown(summary: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 0) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors_by_status"].items()))
    lines = [
        f"Soak of {summary['url']}/predict-image: {summary['minutes']:.2f} min at concurrency "
        f"{summary['concurrency']}",
        "",
        "| requests | req/s | ok | expected 4xx | errors | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {summary['requests']} | {number(summary['rps'], 1)} | {summary['ok']} "
        f"| {summary['expected_4xx']} | {summary['errors']} | {number(summary['p50_ms'])} "
        f"| {number(summary['p95_ms'])} | {number(summary['p99_ms'])} "
        f"| {number(summary['max_ms'])} |",
        "",
        f"Errors by status: {errors or 'none'}. "
        f"Model server restarts: {summary['model_server_restarts']}.",
        "",
        "Answers by upload: "
        + "; ".join(
            f"{kind} " + ", ".join(f"{status} x{n}" for status, n in sorted(answers.items()))
            for kind, answers in summary["answers_by_kind"].items()
        )
        + ".",
        "",
        "| process | pid | RSS start MB | RSS end MB | RSS max MB | slope MB/min (2nd half) |",
        "|---|---|---|---|---|---|",
    ]
    for name, process in summary["processes"].items():
        lines.append(
            f"| {name} | {process['pid']} | {process['rss_start_mb']:.1f} "
            f"| {process['rss_end_mb']:.1f} | {process['rss_max_mb']:.1f} "
            f"| {number(process['rss_slope_mb_per_min'], 2)} |"
        )
    if not summary["processes"]:
        lines.append("| (no process found to sample) | | | | | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--url", help="a running gateway on this machine (default: spawn `serve` for the run)"
    )
    target.add_argument(
        "--model-base-path",
        default="saved_models/image_classifier",
        help="export the spawned `serve` loads (default saved_models/image_classifier)",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="stop after this many (1,000,000)"
    )
    parser.add_argument(
        "--bad-share", type=float, default=0.05, help="share of bad uploads (default 0.05)"
    )
    parser.add_argument("--report-seconds", type=float, default=60.0, help="report every (60)")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="RSS sampling (5)")
    parser.add_argument("--seed", type=int, default=0, help="upload order (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.max_requests < 1:
        parser.error("--minutes, --concurrency and --max-requests must be positive")
    if not 0 <= args.bad_share <= 1:
        parser.error("--bad-share must be between 0 and 1")
    if args.report_seconds <= 0 or args.sample_seconds <= 0:
        parser.error("--report-seconds and --sample-seconds must be positive")

    def soak(url: str, gateway_pid: int | None) -> dict[str, Any]:
        host = urlsplit(url).hostname
        if host not in LOOPBACK:
            parser.error(f"refusing to load {host!r}: only 127.0.0.1/localhost/::1")
        runner = Soak(url.rstrip("/"), gateway_pid, args)
        print(
            f"Soaking {url}/predict-image for {args.minutes:g} min at concurrency "
            f"{args.concurrency} ({args.bad_share:.0%} bad uploads); gateway pid "
            f"{gateway_pid or 'unknown'}, model server pid "
            f"{(model_server_child(gateway_pid) if gateway_pid else None) or 'unknown'}",
            flush=True,
        )
        asyncio.run(runner.run())
        return runner.summary()

    if args.url:
        port = urlsplit(args.url).port or 80
        summary = soak(args.url, listening_pid(port))
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
            log_path = Path(scratch) / "serve.log"
            with spawned_serve(args.model_base_path, log_path) as (url, pid):
                summary = soak(url, pid)
            summary["serve_log_warnings"] = log_warnings(log_path)
    print()
    print(markdown(summary))
    if warnings := summary.get("serve_log_warnings"):
        print(f"\nserve logged {len(warnings)} warnings/errors; the last ones:")
        print("\n".join(warnings[-15:]))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"\nJSON written to {args.json}")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
