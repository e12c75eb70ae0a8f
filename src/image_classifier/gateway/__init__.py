"""The HTTP gateway: web page, REST API and metrics in front of the model.

A picture's way through it, one module each: :mod:`.routes` (HTTP in) -> :mod:`.pipeline`
(:mod:`image_classifier.preprocess`, then :mod:`.backends`, then :mod:`.postprocess`) -> the
response :mod:`.schemas`. Around that: :mod:`.settings`, :mod:`.deps`, :mod:`.errors` and
:mod:`.handlers` (one error body), :mod:`.middleware` and :mod:`.context` (request ids, access
log), :mod:`.metrics`, :mod:`.app` (``create_app(settings)``) and :mod:`.server` (uvicorn).

Importing this package imports neither TensorFlow nor anything heavy; only the ``local`` backend
imports TensorFlow, when it starts. Names are resolved on first use (PEP 562). Public surface:
:func:`create_app`, :class:`GatewaySettings`, :func:`load_settings`, :class:`SettingsError`,
:func:`build_server`, :func:`run_gateway`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from image_classifier.gateway.app import create_app
    from image_classifier.gateway.server import build_server, run_gateway
    from image_classifier.gateway.settings import GatewaySettings, SettingsError, load_settings

_EXPORTS = {
    "create_app": "app",
    "build_server": "server",
    "run_gateway": "server",
    "GatewaySettings": "settings",
    "SettingsError": "settings",
    "load_settings": "settings",
}

__all__ = [
    "GatewaySettings",
    "SettingsError",
    "build_server",
    "create_app",
    "load_settings",
    "run_gateway",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
