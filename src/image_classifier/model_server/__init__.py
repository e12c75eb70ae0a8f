"""The embedded model server: TensorFlow Serving's REST API for this project's SavedModel.

``image-classifier model-server --rest_api_port 8501 --model_name image_classifier
--model_base_path saved_models/image_classifier`` answers what tensorflow_model_server's REST
port answers (status, metadata, ``:predict`` in row and columnar form, errors as
``{"error": ...}``), serves the highest version and swaps in new ones without a restart.

Public surface: :class:`ModelServerSettings`, :func:`create_app` (an ASGI app; the model loads
in its lifespan), :func:`run_model_server` (blocking), and the CLI hooks :func:`add_arguments`,
:func:`add_cli`, :func:`run_from_args`, :func:`main`. Importing this package imports neither
TensorFlow nor FastAPI; they load when an app is created or a server started.

Internals, in the order a request meets them: ``_app`` (routes, body limit, threads),
``_service`` (TF Serving's URL grammar and API calls), ``_codec`` (JSON <-> tensors),
``_manager`` (versions, polling, atomic swap), ``_signatures`` (the SavedModel's signature_def),
``_errors`` (status codes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from image_classifier.model_server._cli import (
    add_arguments,
    add_cli,
    main,
    run_from_args,
    run_model_server,
)
from image_classifier.model_server._settings import ModelServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from image_classifier.model_server._manager import ModelManager

__all__ = [
    "ModelServerSettings",
    "add_arguments",
    "add_cli",
    "create_app",
    "main",
    "run_from_args",
    "run_model_server",
]


def create_app(
    settings: ModelServerSettings | None = None, *, manager: ModelManager | None = None
) -> FastAPI:
    """The model server's ASGI app (see :func:`image_classifier.model_server._app.create_app`)."""
    from image_classifier.model_server._app import create_app as _create_app

    return _create_app(settings, manager=manager)
