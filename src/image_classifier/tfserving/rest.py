"""TF Serving's REST URL grammar: ``/v1/models/NAME[/versions/N | /labels/L][:verb | /metadata]``.

The server matches paths with :func:`parse_path` (TF Serving's own regular expressions, from
``model_servers/http_rest_api_util.cc``); clients build them with :func:`model_path` and
:func:`predict_path`, so both ends agree on one spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, cast

from image_classifier.tfserving.errors import InvalidArgumentError

ApiKind = Literal["status", "metadata", "predict", "classify", "regress"]

_PREDICTION_RE: Final = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE: Final = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True)
class ApiCall:
    """What a ``/v1/...`` URL asks for."""

    kind: ApiKind
    model_name: str
    version: int | None
    label: str | None = None  # /labels/L: a version label of the --model_config_file


def parse_path(method: str, path: str) -> ApiCall:
    """Match ``path`` as TF Serving does; anything else under /v1 is a "Malformed request"."""
    if method == "POST" and (match := _PREDICTION_RE.fullmatch(path)):
        name, version_text, label, verb = match.groups()
        kind = cast(ApiKind, verb.lower())  # the regex admits only these verbs
        return ApiCall(kind, name, _version(version_text), label)
    if method == "GET" and (match := _STATUS_RE.fullmatch(path)):
        name, version_text, label, subresource = match.groups()
        if not name:
            raise InvalidArgumentError("Missing model name in request.")
        kind = "metadata" if subresource else "status"
        return ApiCall(kind, name, _version(version_text), label)
    raise InvalidArgumentError(f"Malformed request: {method} {path}")


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    version = int(text)
    if version > _INT64_MAX:
        raise InvalidArgumentError(f"Failed to convert version: {text} to numeric.")
    return version


def model_path(
    model_name: str, version: int | str | None = None, *, label: str | None = None
) -> str:
    """``/v1/models/NAME[/versions/N | /labels/L]`` (status; append ``/metadata``)."""
    path = f"/v1/models/{model_name}"
    if label is not None:
        return f"{path}/labels/{label}"
    return f"{path}/versions/{version}" if version is not None else path


def predict_path(
    model_name: str, version: int | str | None = None, *, label: str | None = None
) -> str:
    """``/v1/models/NAME[/versions/N | /labels/L]:predict``."""
    return f"{model_path(model_name, version, label=label)}:predict"
