"""Run a multi-worker training cluster on this machine, reachable from nowhere else.

TensorFlow's gRPC server binds every interface of the machine, whatever host its ``TF_CONFIG``
address names. So the workers run inside a private network namespace (``unshare --net``, with a
user namespace so no privilege is needed) whose only interface is loopback: they talk to each
other over 127.0.0.1 and nothing outside the namespace can reach them.

    python tests/cluster.py LOG_DIR WORKERS -- ARGS...

brings the namespace's loopback up, picks free ports, starts WORKERS processes of
``python -m image_classifier ARGS...`` with ``TF_CONFIG`` naming them (worker ``i`` logs to
``LOG_DIR/worker-i.log``), waits for all, and exits with the first non-zero status (or 0).
If one worker fails, the others are stopped: their collectives would otherwise wait forever.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

# Linux ioctls (include/uapi/linux/sockios.h) and the interface flag (if.h).
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def unshare_command() -> list[str]:
    """The prefix that runs a command in a new network namespace with only loopback."""
    return ["unshare", "--net", "--map-root-user", "--"]


def loopback_up() -> None:
    """A new network namespace starts with `lo` down; bring it up (no `ip` tool needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )


def run_workers(log_dir: Path, workers: int, args: list[str], timeout: float = 300.0) -> int:
    loopback_up()
    ports = free_ports(workers)
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CONFIG": tf_config(ports, index), "PYTHONUNBUFFERED": "1"}
        with (log_dir / f"worker-{index}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "image_classifier", *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout
    status = 0
    while any(p.poll() is None for p in processes):
        failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            status = failed[0] if failed else 124
            break
        time.sleep(0.2)
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
    return status or next((p.returncode for p in processes if p.returncode), 0)


if __name__ == "__main__":
    separator = sys.argv.index("--")
    log_dir, workers = Path(sys.argv[1]), int(sys.argv[2])
    sys.exit(run_workers(log_dir, workers, sys.argv[separator + 1 :]))
