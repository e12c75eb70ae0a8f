"""Model version states and the status body: ``GET /v1/models/NAME[/versions/N]``.

The model server writes this body, and the gateway's TF Serving client, the ``serve``
supervisor and the tests read it; all of them use these names, so a state is spelled once.
Field names and shapes are TF Serving's (``GetModelStatusResponse`` printed by protobuf's JSON
printer: int64 versions as strings, the error status nested under ``status``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

# ModelVersionStatus.State, in the order a version goes through them.
START: Final = "START"
LOADING: Final = "LOADING"
AVAILABLE: Final = "AVAILABLE"
UNLOADING: Final = "UNLOADING"
END: Final = "END"
# Not TF Serving states: what a client reports when it has no state to read.
UNKNOWN: Final = "UNKNOWN"
NOT_FOUND: Final = "NOT_FOUND"
UNREACHABLE: Final = "UNREACHABLE"

State = Literal[
    "START", "LOADING", "AVAILABLE", "UNLOADING", "END", "UNKNOWN", "NOT_FOUND", "UNREACHABLE"
]

STATUS_KEY: Final = "model_version_status"


@dataclass(frozen=True)
class VersionStatus:
    """One entry of ``model_version_status``."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": str(self.version),  # int64 fields are JSON strings in protobuf's mapping
            "state": self.state,
            "status": {"error_code": self.error_code, "error_message": self.error_message},
        }

    @property
    def failed(self) -> bool:
        return self.error_code not in ("OK", "0")


def status_body(statuses: Sequence[VersionStatus]) -> dict[str, Any]:
    """The JSON body of a status answer."""
    return {STATUS_KEY: [status.to_json() for status in statuses]}


def parse_status_body(body: Any) -> list[VersionStatus]:
    """A status answer's entries; malformed entries are skipped, never raised on.

    Clients read this from a server they do not control, so a missing field is a missing
    version, not a crash.
    """
    entries = body.get(STATUS_KEY) if isinstance(body, dict) else None
    if not isinstance(entries, list):
        return []
    parsed: list[VersionStatus] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        try:
            version = int(entry.get("version", -1))
        except (TypeError, ValueError):
            version = -1
        status = entry.get("status")
        status = status if isinstance(status, dict) else {}
        parsed.append(
            VersionStatus(
                version=version,
                state=str(entry.get("state", UNKNOWN)),
                error_code=str(status.get("error_code", "OK")),
                error_message=str(status.get("error_message", "")),
            )
        )
    return parsed


def serving_status(statuses: Sequence[VersionStatus]) -> VersionStatus | None:
    """The version a request without a version goes to: the highest AVAILABLE one.

    With none AVAILABLE, the highest version of any state (it says why nothing is served).
    """
    if not statuses:
        return None
    available = [s for s in statuses if s.state == AVAILABLE]
    return max(available or statuses, key=lambda s: s.version)
