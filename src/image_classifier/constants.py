"""The input/output contract every stage shares: image size, class names, signature names.

Training, export, the model server and the gateway import these; nothing else spells them out.
"""

from __future__ import annotations

from typing import Final

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

# SavedModel signatures: `serving_default` takes floats in [0, 1]; `serving_bytes` takes encoded
# images (JPEG/PNG/...) so TF Serving REST clients can send `{"b64": ...}` directly.
SERVING_DEFAULT: Final = "serving_default"
SERVING_BYTES: Final = "serving_bytes"
INPUT_KEY: Final = "images"
BYTES_INPUT_KEY: Final = "image_bytes"
OUTPUT_KEY: Final = "probabilities"

# Files written next to the SavedModel inside a version directory.
CLASS_NAMES_ASSET: Final = "class_names.txt"
METADATA_FILE: Final = "metadata.json"
HISTORY_FILE: Final = "history.json"
CURVES_FILE: Final = "training_curves.png"
CONFUSION_FILE: Final = "confusion_matrix.png"
