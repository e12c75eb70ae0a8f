"""Measure an export the way it is served: through its SavedModel signature, not Keras.

Reports overall and per-class accuracy (JSON) and writes a confusion-matrix PNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from image_classifier.constants import CONFUSION_FILE
from image_classifier.data import Dataset, load_splits
from image_classifier.errors import DatasetError
from image_classifier.preprocess import normalize
from image_classifier.servable import Servable, load_servable


@dataclass
class EvaluationReport:
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion_matrix: np.ndarray
    num_images: int
    split: str
    model_version: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "split": self.split,
            "num_images": self.num_images,
            "accuracy": round(self.accuracy, 4),
            "per_class_accuracy": {k: round(v, 4) for k, v in self.per_class_accuracy.items()},
            "confusion_matrix": self.confusion_matrix.tolist(),
        }


# Images per model call: large enough to amortise the call, small enough to keep activations of
# a 10,000-image test set far below memory limits.
EVAL_BATCH_SIZE: Final = 500


def predict_in_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int = EVAL_BATCH_SIZE,
) -> np.ndarray:
    """``predict`` (float32 [0, 1] batch -> probabilities) over uint8 ``images``, in batches."""
    outputs = [
        predict(normalize(images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def predict_dataset(
    servable: Servable, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE
) -> np.ndarray:
    """Probabilities for every image of ``dataset`` from the export's ``serving_default``."""
    return predict_in_batches(servable.predict, dataset.images, batch_size)


def evaluate_servable(
    servable: Servable, dataset: Dataset, *, split: str, batch_size: int = EVAL_BATCH_SIZE
) -> EvaluationReport:
    if tuple(dataset.class_names) != tuple(servable.class_names):
        raise DatasetError(
            f"the data's classes {dataset.class_names} differ from the model's "
            f"{servable.class_names}"
        )
    predicted = predict_dataset(servable, dataset, batch_size).argmax(axis=1)
    n = len(servable.class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (dataset.labels, predicted), 1)
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    return EvaluationReport(
        accuracy=float(matrix.trace() / max(1, matrix.sum())),
        per_class_accuracy={
            name: float(acc) for name, acc in zip(servable.class_names, per_class, strict=True)
        },
        confusion_matrix=matrix,
        num_images=len(dataset),
        split=split,
        model_version=servable.version,
    )


def evaluate(
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None,
    *,
    version: int | None = None,
    validation_size: int | None = None,
    seed: int | None = None,
    confusion_png: str | os.PathLike[str] | None = None,
    split: Literal["auto", "test", "validation"] = "auto",
) -> EvaluationReport:
    """Evaluate on the test set when the data has one (``split="auto"``), else on validation.

    The validation split is recreated with the size and seed recorded in the export's model
    card, so it is the same held-out data the model was selected on. The confusion-matrix PNG
    and ``evaluation_<split>.json`` are written into the version directory (files TF Serving
    ignores) unless ``confusion_png`` names another place.
    """
    from image_classifier.plots import plot_confusion_matrix

    servable = load_servable(model_dir, version)
    card = servable.metadata
    size = validation_size or card.get("data", {}).get("validation_images") or 5000
    split_seed = seed if seed is not None else card.get("data", {}).get("validation_seed", 0)
    splits = load_splits(data_dir, validation_size=int(size), seed=int(split_seed))
    if split == "test" and splits.test is None:
        raise DatasetError("the data has no test set (test_batch); use --split validation")
    if split in ("auto", "test") and splits.test is not None:
        report = evaluate_servable(servable, splits.test, split="test")
    else:
        report = evaluate_servable(servable, splits.validation, split="validation")
    target = Path(confusion_png) if confusion_png else servable.path / CONFUSION_FILE
    summary = json.dumps(report.to_dict(), indent=2) + "\n"
    try:
        plot_confusion_matrix(report.confusion_matrix, servable.class_names, target)
        (target.parent / f"evaluation_{report.split}.json").write_text(summary, encoding="utf-8")
    except OSError:
        # A read-only export (e.g. mounted into a container): write to the working directory.
        plot_confusion_matrix(report.confusion_matrix, servable.class_names, target.name)
        Path(f"evaluation_{report.split}.json").write_text(summary, encoding="utf-8")
    return report
