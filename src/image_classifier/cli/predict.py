"""``image-classifier predict IMAGE...``: send pictures to a running gateway, print the classes.

Exit status: 0 every image classified, 1 at least one was refused (bad image, wrong key...),
2 usage error, 3 the gateway could not be reached or timed out.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from image_classifier.cli._common import SubParsers
from image_classifier.constants import DEFAULT_GATEWAY_URL, DEFAULT_TOP_K, MAX_TOP_K

if TYPE_CHECKING:
    import httpx  # imported when the command runs: the CLI must build without the web stack

EXIT_OK, EXIT_IMAGE_FAILED, EXIT_UNREACHABLE = 0, 1, 3
_BAR_WIDTH = 30


class GatewayUnreachableError(Exception):
    """The gateway did not answer at all (refused, DNS, timeout)."""


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with a running gateway",
        description="Send each IMAGE to the gateway's /predict-image and print its top classes. "
        "Exit status: 0 all classified, 1 some image refused, 3 gateway unreachable.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument(
        "--url",
        default=os.environ.get("GATEWAY_URL", DEFAULT_GATEWAY_URL),
        help=f"gateway base URL (GATEWAY_URL, default {DEFAULT_GATEWAY_URL})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        choices=range(1, MAX_TOP_K + 1),
        metavar="K",
        help=f"classes to show per image, 1-{MAX_TOP_K} (default {DEFAULT_TOP_K})",
    )
    parser.add_argument("--json", action="store_true", help="print the answers as one JSON array")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GATEWAY_API_KEY") or None,
        help="sent as X-API-Key when the gateway requires one (GATEWAY_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.set_defaults(func=run)


def _client(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    import httpx

    host = urlsplit(url).hostname or ""
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.Client(
        base_url=url.rstrip("/"),
        headers=headers,
        timeout=timeout,
        # A corporate HTTP(S)_PROXY must not swallow requests to a gateway on this machine.
        trust_env=host not in ("localhost", "127.0.0.1", "::1"),
    )


def classify_file(client: httpx.Client, path: Path, top_k: int) -> dict[str, Any]:
    """One image -> the gateway's answer, or ``{"error": {...}}`` for this image alone.

    Raises :class:`GatewayUnreachableError` when there is no answer at all.
    """
    import httpx

    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"error": {"code": "unreadable_file", "message": exc.strerror or str(exc)}}
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    try:
        response = client.post(
            "/predict-image",
            params={"top_k": top_k},
            files={"file": (path.name, data, content_type)},
        )
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise GatewayUnreachableError(
            f"cannot reach the gateway at {client.base_url} ({exc or type(exc).__name__}); "
            "is it running? Start it with `image-classifier serve`."
        ) from None
    except httpx.TimeoutException:
        raise GatewayUnreachableError(
            f"the gateway at {client.base_url} did not answer in time"
        ) from None
    except httpx.HTTPError as exc:
        raise GatewayUnreachableError(
            f"request to {client.base_url} failed: {exc or type(exc).__name__}"
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict):
        return body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return {"error": {**body["error"], "status": response.status_code}}
    return {
        "error": {
            "code": "http_error",
            "status": response.status_code,
            "message": f"HTTP {response.status_code}: {response.text[:200]}",
        }
    }


def format_result(image: str, result: dict[str, Any]) -> str:
    if "error" in result:
        error = result["error"]
        status = f" (HTTP {error['status']})" if "status" in error else ""
        return f"{image}: error {error.get('code', 'error')}{status}: {error.get('message', '')}"
    predictions = result["predictions"]
    label_width = max(len("label"), *(len(p["label"]) for p in predictions))
    lines = [
        f"{image}  ->  {predictions[0]['label']}  "
        f"[{result['model_name']} v{result['model_version']}]",
        f"  {'#':>2}  {'label':<{label_width}}  {'probability':>11}",
    ]
    for rank, p in enumerate(predictions, start=1):
        bar = "#" * round(p["probability"] * _BAR_WIDTH)
        lines.append(f"  {rank:>2}  {p['label']:<{label_width}}  {p['probability']:>10.2%}  {bar}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    collected: list[dict[str, Any]] = []
    failed = False
    with _client(args.url, args.api_key, args.timeout) as client:
        for name in args.images:
            try:
                result = classify_file(client, Path(name), args.top_k)
            except GatewayUnreachableError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE
            failed = failed or "error" in result
            if args.json:
                collected.append({"image": name, **result})
            else:
                print(format_result(name, result), file=sys.stderr if "error" in result else None)
    if args.json:
        print(json.dumps(collected, indent=2))
    return EXIT_IMAGE_FAILED if failed else EXIT_OK
