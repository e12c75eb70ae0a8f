"""The contract every stage shares: image size, class names, signature names, ports, limits.

Training, export, the model server, the gateway and the CLI import these; nothing else spells
them out.
"""

from __future__ import annotations

from typing import Final, Literal

IMAGE_SIZE: Final = 32
CHANNELS: Final = 3
INPUT_SHAPE: Final = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)

# CIFAR-10 label order, as in `batches.meta`.
CIFAR10_CLASSES: Final = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_CLASSES: Final = len(CIFAR10_CLASSES)

MODEL_NAME: Final = "image_classifier"
DEFAULT_MODEL_BASE_PATH: Final = "saved_models/image_classifier"

# Where things listen. Servers bind to loopback unless told otherwise; the REST port is TF
# Serving's, so its clients' URLs work unchanged.
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_REST_API_PORT: Final = 8501
DEFAULT_GRPC_PORT: Final = 8500  # TF Serving's --port (PredictionService, ModelService)
DEFAULT_GATEWAY_PORT: Final = 8000
DEFAULT_TF_SERVING_URL: Final = f"http://localhost:{DEFAULT_REST_API_PORT}"
DEFAULT_GATEWAY_URL: Final = f"http://localhost:{DEFAULT_GATEWAY_PORT}"

# How long a client may take to send a request, and how many connections a server takes, for
# both HTTP servers (a slow or stalled client must not hold a connection for ever).
DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
DEFAULT_BODY_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 256

# Decoded pixels a request may hold, and a server may hold at once across requests: a PNG of a
# blank 7000x7000 canvas is a few kB on the wire and 147 MB decoded (more inside TensorFlow).
MAX_REQUEST_PIXELS: Final = 100_000_000
DECODE_BUDGET_PIXELS: Final = 100_000_000

# How many classes an answer lists.
DEFAULT_TOP_K: Final = 3
MAX_TOP_K: Final = NUM_CLASSES

# Where the gateway's model runs: TF Serving (or the embedded server) over REST, or in-process.
BackendKind = Literal["tfserving", "local"]
BACKENDS: Final[tuple[BackendKind, ...]] = ("tfserving", "local")

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("critical", "error", "warning", "info", "debug")
# text for people reading a terminal; json (one object per line) for log shippers.
LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")

# SavedModel signatures: `serving_default` takes floats in [0, 1]; `serving_bytes` takes encoded
# images (JPEG/PNG/...) so TF Serving REST clients can send `{"b64": ...}` directly.
SERVING_DEFAULT: Final = "serving_default"
SERVING_BYTES: Final = "serving_bytes"
INPUT_KEY: Final = "images"
BYTES_INPUT_KEY: Final = "image_bytes"
OUTPUT_KEY: Final = "probabilities"
# The compact wire: an already preprocessed image is exactly k/255 per channel, so it travels as
# its 3,072 raw uint8 bytes (32x32 RGB, row-major HWC) in a string tensor; over REST that is
# {"b64": ...}, about 4 KB per image instead of ~40 KB of JSON floats, with identical results.
SERVING_PIXELS: Final = "serving_pixels"
PIXELS_INPUT_KEY: Final = "pixels"
PIXELS_BYTES: Final = IMAGE_SIZE * IMAGE_SIZE * CHANNELS

# How an export stores its weights; its serving graph computes in float32 either way. float16
# halves the variables (the graph casts them to float32 where it reads them); float32 is the
# layout of versions 1 to 6, which re-export unchanged.
WeightStorage = Literal["float32", "float16"]
WEIGHT_STORAGES: Final[tuple[WeightStorage, ...]] = ("float32", "float16")
DEFAULT_WEIGHT_STORAGE: Final[WeightStorage] = "float16"

# Files written next to the SavedModel inside a version directory.
CLASS_NAMES_ASSET: Final = "class_names.txt"
METADATA_FILE: Final = "metadata.json"
# The card's test_time_augmentation for an export that averages each image with its mirror.
FLIP_TTA: Final = "horizontal_flip"
HISTORY_FILE: Final = "history.json"
CURVES_FILE: Final = "training_curves.png"
CONFUSION_FILE: Final = "confusion_matrix.png"
# TF Serving replays these requests (a TFRecord of PredictionLog) before a version is AVAILABLE.
WARMUP_FILE: Final = "assets.extra/tf_serving_warmup_requests"
