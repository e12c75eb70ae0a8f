"""The labels the model can answer with, in output order."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from image_classifier.gateway.deps import BackendDep, require_api_key
from image_classifier.gateway.handlers import error_responses
from image_classifier.gateway.schemas import ClassesResponse, ClassInfo

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])


@router.get(
    "/classes",
    response_model=ClassesResponse,
    responses=error_responses(401, 503, 504),
    summary="The classes the model predicts, by output index",
)
async def list_classes(backend: BackendDep) -> ClassesResponse:
    # The labels belong to a model version; for TF Serving the served one is asked for first,
    # so a card describing another version is never used (it falls back to the contract).
    status = await backend.status()
    names = backend.class_names(status.version if status.available else None)
    return ClassesResponse(
        model_name=backend.model_name,
        classes=[ClassInfo(class_index=i, label=label) for i, label in enumerate(names)],
    )
