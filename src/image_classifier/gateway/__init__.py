"""The HTTP gateway: web page, REST API and metrics in front of the model.

Importing this package imports neither TensorFlow nor anything heavy; only the ``local`` backend
imports TensorFlow, when it starts. Names are resolved on first use (PEP 562), so the
``predict`` client does not pay for FastAPI's import. Public surface:

- :func:`create_app` (``create_app(settings)`` -> FastAPI app), :class:`GatewaySettings`,
  :func:`load_settings`, :class:`SettingsError`
- :func:`run_gateway`, :func:`gateway_main` (``image-classifier gateway``)
- :func:`serve_main` (``image-classifier serve``), :func:`predict_main`
  (``image-classifier predict``), each with its ``add_*_arguments``; :func:`add_cli` registers
  all three subcommands on the CLI's subparsers without importing the web stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from image_classifier.gateway.app import create_app
    from image_classifier.gateway.cli_client import predict_main
    from image_classifier.gateway.commands import (
        add_cli,
        add_gateway_arguments,
        add_predict_arguments,
        add_serve_arguments,
    )
    from image_classifier.gateway.run import gateway_main, run_gateway
    from image_classifier.gateway.serve import serve_main
    from image_classifier.gateway.settings import GatewaySettings, SettingsError, load_settings

_EXPORTS = {
    "create_app": "app",
    "add_cli": "commands",
    "add_gateway_arguments": "commands",
    "add_predict_arguments": "commands",
    "add_serve_arguments": "commands",
    "predict_main": "cli_client",
    "gateway_main": "run",
    "run_gateway": "run",
    "serve_main": "serve",
    "GatewaySettings": "settings",
    "SettingsError": "settings",
    "load_settings": "settings",
}

__all__ = [
    "GatewaySettings",
    "SettingsError",
    "add_cli",
    "add_gateway_arguments",
    "add_predict_arguments",
    "add_serve_arguments",
    "create_app",
    "gateway_main",
    "load_settings",
    "predict_main",
    "run_gateway",
    "serve_main",
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
