"""Liveness (the process answers) and readiness (the backend has the model AVAILABLE)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from image_classifier.gateway.deps import BackendDep
from image_classifier.gateway.errors import BackendError, ModelUnavailableError
from image_classifier.gateway.handlers import error_response, error_responses
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
async def ready(backend: BackendDep) -> ReadyResponse | JSONResponse:
    try:
        status = await backend.status()
    except BackendError as exc:
        # Unlike prediction errors, readiness tells the whole story (backend address, socket
        # error): it is what an operator or orchestrator looks at to see why.
        return error_response(exc.status_code, exc.code, str(exc))
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
