"""What is being served: name, version, state, input contract, signatures and model card."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from image_classifier.gateway.backends import Backend
from image_classifier.gateway.deps import BackendDep, SettingsDep, require_api_key
from image_classifier.gateway.errors import BackendError
from image_classifier.gateway.handlers import error_responses
from image_classifier.gateway.schemas import InputContract, ModelInfo
from image_classifier.gateway.settings import DEFAULT_LOW_CONFIDENCE_THRESHOLD, GatewaySettings
from image_classifier.preprocess import SUPPORTED_FORMATS

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])

PREPROCESSING = (
    "decode (EXIF-oriented; grayscale, palette and 16-bit converted; transparency composited on "
    "white) -> largest centred square -> 32x32 antialiased bilinear -> RGB float32 / 255, "
    "by image_classifier.preprocess.preprocess_image"
)


def input_contract(settings: GatewaySettings) -> InputContract:
    # MPO is the multi-picture JPEG some cameras write; listing JPEG covers it for users.
    formats = sorted(set(SUPPORTED_FORMATS) - {"MPO"})
    return InputContract(
        upload_formats=formats,
        max_upload_bytes=settings.max_upload_bytes,
        max_images_per_request=settings.max_images_per_request,
        max_image_pixels=settings.max_image_pixels,
        preprocessing=PREPROCESSING,
    )


@router.get(
    "/model",
    response_model=ModelInfo,
    responses=error_responses(401, 502, 503, 504),
    summary="The served model: version, state, input contract, signatures, model card",
    description="`signatures` comes from the backend (TF Serving's /metadata, or the loaded "
    "SavedModel). `card` is the export's metadata.json: always for the local backend; for the "
    "tfserving backend only when GATEWAY_MODEL_CARD_PATH points at the export TF Serving "
    "serves (the card of the served version is read; none is shown for a version it lacks).",
)
async def model_info(backend: BackendDep, settings: SettingsDep) -> ModelInfo:
    status = await backend.status()
    version = status.version if status.available else None
    signatures = await _signatures(backend, version) if version is not None else None
    card = backend.model_card(version) if version is not None else None
    return ModelInfo(
        name=backend.model_name,
        version=status.version,
        state=status.state,
        backend=backend.kind,
        class_names=list(backend.class_names(version)),
        input=input_contract(settings),
        signatures=signatures,
        card=card.content if card else None,
        card_source=card.source if card else None,
        low_confidence_threshold=low_confidence_threshold(settings, card.content if card else None),
    )


def low_confidence_threshold(settings: GatewaySettings, card: dict[str, Any] | None) -> float:
    """The operator's setting, else the export's calibrated figure, else an even chance."""
    if settings.low_confidence_threshold is not None:
        return settings.low_confidence_threshold
    figure = _card_threshold(card or {})
    return figure if figure is not None else DEFAULT_LOW_CONFIDENCE_THRESHOLD


def _card_threshold(card: dict[str, Any]) -> float | None:
    # Cards name it at the top level or inside their calibration record.
    calibration = card.get("calibration")
    for source in (card, calibration if isinstance(calibration, dict) else {}):
        value = source.get("low_confidence_threshold")
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
            return float(value)
    return None


async def _signatures(backend: Backend, version: str) -> dict[str, Any] | None:
    try:
        return await backend.signatures(version)
    except BackendError:
        # The rest of the answer is still worth having; readiness is /ready's job.
        return None
