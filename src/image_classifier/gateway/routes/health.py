"""Liveness (the process answers) and readiness (the backend has the model AVAILABLE)."""

from __future__ import annotations

from fastapi import APIRouter

from image_classifier.gateway.deps import BackendDep
from image_classifier.gateway.errors import ModelUnavailableError
from image_classifier.gateway.handlers import error_responses
from image_classifier.gateway.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="Liveness: the gateway answers")
async def health() -> HealthResponse:
    # Deliberately ignores the backend: restarting the gateway would not bring TF Serving back.
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses=error_responses(503, 504),
    summary="Readiness: the backend reports the model AVAILABLE",
)
async def ready(backend: BackendDep) -> ReadyResponse:
    status = await backend.status()
    if not status.available:
        detail = f": {status.message}" if status.message else ""
        raise ModelUnavailableError(
            f"model {backend.model_name!r} is {status.state} in the {backend.kind} backend{detail}"
        )
    assert status.version is not None
    return ReadyResponse(
        backend=backend.kind,
        model_name=backend.model_name,
        model_version=status.version,
        state=status.state,
    )
