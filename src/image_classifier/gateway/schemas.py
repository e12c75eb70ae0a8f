"""Request and response bodies of the gateway API (what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from image_classifier.constants import (
    IMAGE_SIZE,
    INPUT_KEY,
    MAX_TOP_K,
    OUTPUT_KEY,
    SERVING_DEFAULT,
    BackendKind,
)

# --- errors ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_image.")
    message: str = Field(description="What went wrong, in words.")


class ErrorBody(ErrorInfo):
    request_id: str | None = Field(None, description="Also in the X-Request-ID header and logs.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Per-field problems of a 422 validation error."
    )


class ErrorResponse(BaseModel):
    """The body of every non-2xx response."""

    error: ErrorBody


# --- predictions ----------------------------------------------------------------------------


class ClassPrediction(BaseModel):
    label: str
    class_index: int
    probability: float = Field(ge=0.0, le=1.0)


class PredictImageResponse(BaseModel):
    filename: str | None
    predictions: list[ClassPrediction] = Field(description="Most probable first.")
    model_name: str
    model_version: str


class ImageResult(BaseModel):
    """One image of a batch: either ``predictions`` or ``error`` is set."""

    filename: str | None
    predictions: list[ClassPrediction] | None = None
    error: ErrorInfo | None = None


class PredictImagesResponse(BaseModel):
    results: list[ImageResult] = Field(description="One per image, in request order.")
    model_name: str
    model_version: str | None = Field(
        description="None only when no image was valid (the model was not called)."
    )


class Base64Image(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="The encoded image file (JPEG, PNG, ...), standard base64.")
    filename: str | None = Field(None, max_length=255)


class PredictRequest(BaseModel):
    """JSON twin of ``POST /predict-images`` for clients that cannot send multipart."""

    model_config = ConfigDict(extra="forbid")

    images: list[Base64Image] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)


# --- model and classes ----------------------------------------------------------------------


class ClassInfo(BaseModel):
    class_index: int
    label: str


class ClassesResponse(BaseModel):
    model_name: str
    classes: list[ClassInfo]


class TensorContract(BaseModel):
    name: str
    dtype: str
    shape: list[int]
    description: str


class InputContract(BaseModel):
    """What a client sends the gateway, and what the gateway sends the model."""

    upload_formats: list[str]
    max_upload_bytes: int
    max_images_per_request: int
    max_image_pixels: int
    preprocessing: str
    signature_name: str = SERVING_DEFAULT
    model_input: TensorContract = TensorContract(
        name=INPUT_KEY,
        dtype="float32",
        shape=[-1, IMAGE_SIZE, IMAGE_SIZE, 3],
        description="RGB in [0, 1], NHWC",
    )
    model_output: TensorContract = TensorContract(
        name=OUTPUT_KEY, dtype="float32", shape=[-1, -1], description="softmax per class"
    )


class ModelInfo(BaseModel):
    name: str
    version: str | None
    state: str
    backend: BackendKind
    class_names: list[str]
    input: InputContract
    signatures: dict[str, Any] | None = Field(
        None, description="The served signature_def (TF Serving's /metadata)."
    )
    card: dict[str, Any] | None = Field(
        None,
        description="The export's metadata.json. For the tfserving backend only when "
        "GATEWAY_MODEL_CARD_PATH points at the served export.",
    )
    card_source: str | None = Field(None, description="Where the card was read.")


# --- health ---------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    backend: BackendKind
    model_name: str
    model_version: str
    state: str
