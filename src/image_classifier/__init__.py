"""CIFAR-10 image classification with a Temporal Convolutional Network.

The shared contract: :mod:`constants`, :mod:`errors`, :mod:`preprocess`. The model's life, one
module each: :mod:`data`, :mod:`model`, :mod:`train`, :mod:`calibration` (temperature, ECE),
:mod:`export`, :mod:`servable` (versions on disk), :mod:`evaluate`, :mod:`plots`,
:mod:`model_card` (the card's figures as README shows them). Serving: :mod:`tfserving` (TF
Serving's protocol, defined once), :mod:`kserve_v2` (the Open Inference Protocol's),
:mod:`model_server` (the embedded TF-Serving-compatible server: REST, gRPC, KServe v2),
:mod:`gateway` (the HTTP API in front of it), :mod:`supervisor` (runs the model server for
``serve``), :mod:`client` (request bodies from pictures). :mod:`cli` wraps it all as
``image-classifier``. Importing the package imports neither TensorFlow nor the web stack.
"""

from image_classifier.constants import CIFAR10_CLASSES, IMAGE_SIZE, MODEL_NAME, NUM_CLASSES
from image_classifier.preprocess import preprocess_image

__version__ = "0.1.0"

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_SIZE",
    "MODEL_NAME",
    "NUM_CLASSES",
    "__version__",
    "preprocess_image",
]
