"""CIFAR-10 image classification with a Temporal Convolutional Network.

Stages, one module each, in the order a picture travels: :mod:`constants` (the contract),
:mod:`preprocess`, :mod:`data`, :mod:`model`, :mod:`train`, :mod:`export`, :mod:`evaluate`,
:mod:`model_server`, :mod:`gateway`, :mod:`cli`. Importing the package imports neither
TensorFlow nor the web stack.
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
