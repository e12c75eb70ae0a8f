"""Request and response bodies of the gateway API (what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from image_classifier.constants import (
    BYTES_INPUT_KEY,
    IMAGE_SIZE,
    INPUT_KEY,
    MAX_TOP_K,
    OUTPUT_KEY,
    SERVING_BYTES,
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
    """One image of ``images``: its encoded file as ``data`` (or ``b64``, TF Serving's word)."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        None, description="The encoded image file (JPEG, PNG, ...), standard base64."
    )
    b64: str | None = Field(None, description="Same as `data`, spelled as TF Serving spells it.")
    filename: str | None = Field(None, max_length=255)

    @model_validator(mode="after")
    def _one_payload(self) -> Base64Image:
        if (self.data is None) == (self.b64 is None):
            raise ValueError("give the image as exactly one of `data` or `b64`")
        return self

    @property
    def payload(self) -> str:
        return self.data if self.data is not None else self.b64 or ""


class B64Value(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(description="The encoded image file, standard base64.")


# What a TF Serving REST client sends the `serving_bytes` signature, row form: a bare
# {"b64": ...} (one input) or the input named, {"image_bytes": {"b64": ...}}.
TFServingInstance = B64Value | dict[str, B64Value]


class PredictRequest(BaseModel):
    """JSON twin of ``POST /predict-images`` for clients that cannot send multipart.

    Two spellings: the gateway's own ``{"images": [{"data": ...}]}``, and the TF Serving REST
    body a client of the ``serving_bytes`` signature already sends,
    ``{"instances": [{"b64": ...}]}``, so switching such a client to the gateway changes only
    its URL.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": [{"data": "/9j/4AAQSkZJRg...", "filename": "cat.jpg"}], "top_k": 3},
                {"instances": [{"b64": "/9j/4AAQSkZJRg..."}]},
            ]
        },
    )

    images: list[Base64Image] | None = Field(None, min_length=1)
    instances: list[TFServingInstance] | None = Field(
        None,
        min_length=1,
        description=f"TF Serving's row form for the `{SERVING_BYTES}` signature: "
        f'`{{"b64": ...}}` or `{{"{BYTES_INPUT_KEY}": {{"b64": ...}}}}` per image.',
    )
    signature_name: str | None = Field(
        None,
        description="Accepted so TF Serving request bodies work unchanged; the gateway always "
        "decodes the images itself and calls the model's pixel signature.",
    )
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)

    @model_validator(mode="after")
    def _one_list(self) -> PredictRequest:
        if (self.images is None) == (self.instances is None):
            raise ValueError("send exactly one of `images` (the gateway's form) or `instances`")
        for row in self.instances or []:
            if isinstance(row, dict) and list(row) != [BYTES_INPUT_KEY]:
                raise ValueError(
                    f'each instance is {{"b64": ...}} or {{"{BYTES_INPUT_KEY}": {{"b64": ...}}}}'
                    f"; got the keys {sorted(row)}"
                )
        return self

    def encoded_images(self) -> list[tuple[str | None, str]]:
        """(filename, base64 text) per image, in request order, whichever spelling was sent."""
        if self.images is not None:
            return [(image.filename, image.payload) for image in self.images]
        rows = self.instances or []
        return [
            (None, (row if isinstance(row, B64Value) else row[BYTES_INPUT_KEY]).b64) for row in rows
        ]


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
    low_confidence_threshold: float = Field(
        description="A top-1 probability below this means the model is not sure (the web page "
        "says so and shows the runners-up): GATEWAY_LOW_CONFIDENCE_THRESHOLD, else the card's "
        "calibrated low_confidence_threshold, else 0.5."
    )


# --- health ---------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    backend: BackendKind
    model_name: str
    model_version: str
    state: str
