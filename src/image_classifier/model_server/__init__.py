"""The embedded model server: TensorFlow Serving's REST API for this project's SavedModel.

``image-classifier model-server --rest_api_port 8501 --model_name image_classifier
--model_base_path saved_models/image_classifier`` answers what tensorflow_model_server's REST
port answers (status, metadata, ``:predict`` in row and columnar form, errors as
``{"error": ...}``), serves the highest version and swaps in new ones without a restart.

Public surface: :class:`ModelServerSettings`, :func:`create_app` (an ASGI app; the model loads
in its lifespan) and :func:`run_model_server` (blocking). Importing this package imports neither
TensorFlow nor FastAPI; they load when an app is created or a server started.

Internals, in the order a request meets them: ``_app`` (routes, threads), ``_service`` (TF
Serving's API calls over the manager), ``_manager`` (versions, polling, atomic swap),
``_settings`` and ``_server`` (uvicorn). The protocol itself (URL grammar, JSON <-> tensors,
status body, signature_def, canonical errors) is :mod:`image_classifier.tfserving`.
The same port also speaks the Open Inference Protocol (KServe v2): ``_v2`` routes it into the
same models and predict path, its wire format is :mod:`image_classifier.kserve_v2`; ``_cors``
is ``--rest_api_enable_cors_support``. ``_grpc`` serves TF Serving's gRPC API on ``--port``
(PredictionService, ModelService, health) from the same registry, batcher and signature runner;
``_manager``'s registry holds several models when ``--model_config_file`` names them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from image_classifier.model_server._server import run_model_server
from image_classifier.model_server._settings import ModelServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from image_classifier.model_server._manager import ModelManager

__all__ = ["ModelServerSettings", "create_app", "run_model_server"]


def create_app(
    settings: ModelServerSettings | None = None, *, manager: ModelManager | None = None
) -> FastAPI:
    """The model server's ASGI app (see :func:`image_classifier.model_server._app.create_app`)."""
    from image_classifier.model_server._app import create_app as _create_app

    return _create_app(settings, manager=manager)
