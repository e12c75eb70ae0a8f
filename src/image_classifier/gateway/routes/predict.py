"""Predictions: one uploaded file, several uploaded files, or base64 images in JSON."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from image_classifier.constants import MAX_TOP_K
from image_classifier.gateway.deps import (
    BackendDep,
    PipelineDep,
    SettingsDep,
    require_api_key,
    require_json,
    require_multipart,
)
from image_classifier.gateway.errors import (
    InvalidBase64Error,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from image_classifier.gateway.handlers import error_responses
from image_classifier.gateway.pipeline import Upload, check_declared_type
from image_classifier.gateway.schemas import (
    PredictImageResponse,
    PredictImagesResponse,
    PredictRequest,
)

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

_TOP_K_HELP = "How many classes to return, most probable first (default GATEWAY_DEFAULT_TOP_K)."
TopKQuery = Annotated[int | None, Query(alias="top_k", ge=1, le=MAX_TOP_K, description=_TOP_K_HELP)]
TopKForm = Annotated[
    int | None,
    Form(alias="top_k", ge=1, le=MAX_TOP_K, description="Same as the query parameter."),
]

_UPLOAD_ERRORS = error_responses(400, 401, 413, 415, 422, 502, 503, 504)
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def _filename(name: str | None) -> str | None:
    return name[:255] if name else None


@router.post(
    "/predict-image",
    response_model=PredictImageResponse,
    responses=_UPLOAD_ERRORS,
    dependencies=[Depends(require_multipart)],
    summary="Classify one uploaded image",
)
async def predict_image(
    file: Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP, GIF or TIFF.")],
    pipeline: PipelineDep,
    backend: BackendDep,
    settings: SettingsDep,
    top_k: TopKQuery = None,
    top_k_form: TopKForm = None,
) -> PredictImageResponse:
    filename = _filename(file.filename)
    check_declared_type(file.content_type, filename)
    upload = Upload(filename, await file.read())
    outcome = await pipeline.classify([upload], top_k or top_k_form or settings.default_top_k)
    item = outcome.items[0]
    if item.error is not None:
        raise item.error
    assert item.predictions is not None and outcome.model_version is not None
    return PredictImageResponse(
        filename=filename,
        predictions=item.predictions,
        model_name=backend.model_name,
        model_version=outcome.model_version,
    )


@router.post(
    "/predict-images",
    response_model=PredictImagesResponse,
    responses=_UPLOAD_ERRORS,
    dependencies=[Depends(require_multipart)],
    summary="Classify several uploaded images (one result per file, in order)",
    description="A file that cannot be classified gets an `error` entry; the others are still "
    "classified. The request fails as a whole only for backend errors and request-level "
    "limits (size, count, content type).",
)
async def predict_images(
    files: Annotated[list[UploadFile], File(description="Repeat the `files` field per image.")],
    pipeline: PipelineDep,
    backend: BackendDep,
    settings: SettingsDep,
    top_k: TopKQuery = None,
    top_k_form: TopKForm = None,
) -> PredictImagesResponse:
    _check_count(len(files), settings.max_images_per_request)
    uploads: list[Upload] = []
    for file in files:
        filename = _filename(file.filename)
        try:
            check_declared_type(file.content_type, filename)
        except UnsupportedMediaTypeError as exc:
            uploads.append(Upload(filename, error=exc))
            continue
        uploads.append(Upload(filename, await file.read()))
    outcome = await pipeline.classify(uploads, top_k or top_k_form or settings.default_top_k)
    return PredictImagesResponse(
        results=[item.to_result() for item in outcome.items],
        model_name=backend.model_name,
        model_version=outcome.model_version,
    )


@router.post(
    "/predict",
    response_model=PredictImagesResponse,
    responses=_UPLOAD_ERRORS,
    dependencies=[Depends(require_json)],
    summary="Classify base64-encoded images sent as JSON",
    description="For clients that cannot send multipart. Same answer as /predict-images. "
    'Either the gateway\'s `{"images": [{"data": ...}]}` or a TF Serving REST body '
    '`{"instances": [{"b64": ...}]}`; the base64 is standard base64 of the image file '
    "(a `data:image/...;base64,` prefix is accepted).",
)
async def predict_json(
    body: PredictRequest,
    pipeline: PipelineDep,
    backend: BackendDep,
    settings: SettingsDep,
) -> PredictImagesResponse:
    encoded = body.encoded_images()
    _check_count(len(encoded), settings.max_images_per_request)
    uploads = [_decode_base64(filename, text) for filename, text in encoded]
    outcome = await pipeline.classify(uploads, body.top_k or settings.default_top_k)
    return PredictImagesResponse(
        results=[item.to_result() for item in outcome.items],
        model_name=backend.model_name,
        model_version=outcome.model_version,
    )


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise TooManyImagesError(
            f"{count} images in one request; the limit is {limit} (GATEWAY_MAX_IMAGES_PER_REQUEST)"
        )


def _decode_base64(filename: str | None, text: str) -> Upload:
    payload = _DATA_URL.sub("", text.strip(), count=1)
    # Line breaks are common in base64 written by other tools (76-column MIME style).
    payload = "".join(payload.split())
    try:
        return Upload(filename, base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        return Upload(
            filename, error=InvalidBase64Error("the image data is not valid standard base64")
        )
