"""Measure an export the way it is served: through its SavedModel signature, not Keras.

Reports overall and per-class accuracy, calibration (ECE, the reliability of the top-1
probability) and accuracy on the same images re-encoded as JPEG at several qualities, each
decoded by the gateway's own preprocessing; writes the JSON report, a confusion-matrix PNG and
a reliability-diagram PNG.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from PIL import Image

from image_classifier.calibration import (
    ECE_BINS,
    ReliabilityBins,
    probabilities_at_temperature_one,
    reliability_bins,
)
from image_classifier.constants import CONFUSION_FILE
from image_classifier.data import Dataset, DataSplits, load_splits
from image_classifier.errors import DatasetError
from image_classifier.preprocess import normalize, preprocess_pixels
from image_classifier.servable import Servable, load_servable

RELIABILITY_FILE: Final = "reliability_diagram.png"
# JPEG qualities the report measures: 90 (a camera's "fine"), 75 (Pillow's and many web
# tools' default), 50 (heavy compression).
JPEG_QUALITIES: Final = (90, 75, 50)


@dataclass
class EvaluationReport:
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion_matrix: np.ndarray
    num_images: int
    split: str
    model_version: int
    reliability: ReliabilityBins | None = None
    # The same images' bins before calibration, when the export is calibrated (card temperature).
    reliability_uncalibrated: ReliabilityBins | None = None
    temperature: float | None = None
    jpeg_accuracy: dict[int, float] = field(default_factory=dict)
    low_confidence: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "model_version": self.model_version,
            "split": self.split,
            "num_images": self.num_images,
            "accuracy": round(self.accuracy, 4),
            "per_class_accuracy": {k: round(v, 4) for k, v in self.per_class_accuracy.items()},
        }
        if self.reliability is not None:
            result["calibration"] = {
                "temperature": self.temperature,
                "ece_bins": ECE_BINS,
                "ece": round(self.reliability.ece, 4),
                "ece_uncalibrated": None
                if self.reliability_uncalibrated is None
                else round(self.reliability_uncalibrated.ece, 4),
                "bins": _bins_to_dict(self.reliability),
            }
        if self.low_confidence is not None:
            result["low_confidence"] = self.low_confidence
        if self.jpeg_accuracy:
            result["jpeg_accuracy"] = {
                f"q{quality}": round(acc, 4) for quality, acc in self.jpeg_accuracy.items()
            }
        result["confusion_matrix"] = self.confusion_matrix.tolist()
        return result


def _bins_to_dict(bins: ReliabilityBins) -> dict[str, list[Any]]:
    def clean(values: np.ndarray) -> list[float | None]:
        return [None if np.isnan(v) else round(float(v), 4) for v in values]

    return {
        "upper_edges": [round(float(e), 4) for e in bins.edges[1:]],
        "count": [int(c) for c in bins.counts],
        "accuracy": clean(bins.accuracy),
        "confidence": clean(bins.confidence),
    }


# Images per model call: large enough to amortise the call, small enough to keep activations of
# a 10,000-image test set far below memory limits.
EVAL_BATCH_SIZE: Final = 500


def predict_in_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int = EVAL_BATCH_SIZE,
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """``predict`` (float32 [0, 1] batch -> probabilities) over uint8 ``images``, in batches;
    ``on_batch`` is called after each (a progress bar)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        outputs.append(predict(normalize(images[start : start + batch_size])))
        if on_batch is not None:
            on_batch()
    return np.concatenate(outputs)


def predict_dataset(
    servable: Servable, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE
) -> np.ndarray:
    """Probabilities for every image of ``dataset`` from the export's ``serving_default``."""
    return predict_in_batches(servable.predict, dataset.images, batch_size)


# Pillow's JPEG ``subsampling`` values: its default (libjpeg's 4:2:0, as cameras and browsers
# write), chroma at full resolution, chroma halved both ways.
PILLOW_DEFAULT_SUBSAMPLING: Final = -1
SUBSAMPLING_444: Final = 0
SUBSAMPLING_420: Final = 2


def jpeg_roundtrip(
    images: np.ndarray, quality: int, *, subsampling: int = PILLOW_DEFAULT_SUBSAMPLING
) -> np.ndarray:
    """Each uint8 image saved as a JPEG by Pillow (its defaults unless ``subsampling`` says
    otherwise) and read back by the gateway's preprocessing, exactly as an upload of that file
    would be."""
    decoded = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
        decoded.append(preprocess_pixels(buffer.getvalue()))
    return np.stack(decoded)


def low_confidence_summary(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, float]:
    """How the card's "not sure" threshold splits these predictions."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    unsure = confidence < threshold

    def share(mask: np.ndarray) -> float:
        return round(float(correct[mask].mean()), 4) if mask.any() else float("nan")

    return {
        "threshold": threshold,
        "share_below": round(float(unsure.mean()), 4),
        "accuracy_below": share(unsure),
        "accuracy_at_or_above": share(~unsure),
    }


def evaluate_servable(
    servable: Servable,
    dataset: Dataset,
    *,
    split: str,
    batch_size: int = EVAL_BATCH_SIZE,
    jpeg_qualities: Sequence[int] = (),
    progress: bool = False,
) -> EvaluationReport:
    """Accuracy, calibration and (for ``jpeg_qualities``) JPEG accuracy of ``serving_default``.

    ``progress`` shows a progress bar on stderr (when it is a terminal).
    """
    if tuple(dataset.class_names) != tuple(servable.class_names):
        raise DatasetError(
            f"the data's classes {dataset.class_names} differ from the model's "
            f"{servable.class_names}"
        )
    batches = -(-len(dataset) // batch_size)
    with _progress_bar(batches * (1 + len(jpeg_qualities)), enabled=progress) as tick:
        probabilities = predict_in_batches(servable.predict, dataset.images, batch_size, tick)
        jpeg_accuracy = {}
        for quality in jpeg_qualities:
            right = 0
            for start in range(0, len(dataset), batch_size):
                pixels = jpeg_roundtrip(dataset.images[start : start + batch_size], quality)
                predicted = servable.predict(normalize(pixels)).argmax(axis=1)
                right += int(np.sum(predicted == dataset.labels[start : start + batch_size]))
                tick()
            jpeg_accuracy[quality] = right / max(1, len(dataset))
    predicted = probabilities.argmax(axis=1)
    n = len(servable.class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (dataset.labels, predicted), 1)
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    temperature = servable.metadata.get("temperature")
    threshold = servable.metadata.get("calibration", {}).get("low_confidence_threshold")
    return EvaluationReport(
        accuracy=float(matrix.trace() / max(1, matrix.sum())),
        per_class_accuracy={
            name: float(acc) for name, acc in zip(servable.class_names, per_class, strict=True)
        },
        confusion_matrix=matrix,
        num_images=len(dataset),
        split=split,
        model_version=servable.version,
        reliability=reliability_bins(probabilities, dataset.labels),
        reliability_uncalibrated=None
        if temperature is None
        else reliability_bins(
            probabilities_at_temperature_one(probabilities, temperature), dataset.labels
        ),
        temperature=temperature,
        jpeg_accuracy=jpeg_accuracy,
        low_confidence=None
        if threshold is None
        else low_confidence_summary(probabilities, dataset.labels, threshold),
    )


@contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Callable[[], None]]:
    """A tqdm bar on stderr (stdout carries the JSON report); yields its one-step callback."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    # disable=None: drawn on a terminal, silent in logs and pipes.
    with tqdm(total=total, desc="evaluate", unit="batch", disable=None) as bar:
        yield lambda: bar.update(1)


def validation_splits(
    card: dict[str, Any],
    data_dir: str | os.PathLike[str] | None,
    *,
    validation_size: int | None = None,
    seed: int | None = None,
) -> DataSplits:
    """The data with the validation split recorded in a model card (size and seed), so it is the
    same held-out data the model was selected (and calibrated) on; arguments override it."""
    recorded = card.get("data", {})
    size = validation_size or recorded.get("validation_images") or 5000
    split_seed = seed if seed is not None else recorded.get("validation_seed", 0)
    return load_splits(data_dir, validation_size=int(size), seed=int(split_seed))


def evaluate(
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None,
    *,
    version: int | None = None,
    validation_size: int | None = None,
    seed: int | None = None,
    confusion_png: str | os.PathLike[str] | None = None,
    split: Literal["auto", "test", "validation"] = "auto",
    jpeg_qualities: Sequence[int] = JPEG_QUALITIES,
    progress: bool = False,
) -> EvaluationReport:
    """Evaluate on the test set when the data has one (``split="auto"``), else on validation.

    The validation split is recreated with the size and seed recorded in the export's model
    card (:func:`validation_splits`). The confusion-matrix PNG, the reliability diagram
    (:data:`RELIABILITY_FILE`, beside it) and ``evaluation_<split>.json`` are written into the
    version directory (files TF Serving ignores) unless ``confusion_png`` names another place.
    """
    from image_classifier.plots import plot_confusion_matrix, plot_reliability_diagram

    servable = load_servable(model_dir, version)
    splits = validation_splits(
        servable.metadata, data_dir, validation_size=validation_size, seed=seed
    )
    if split == "test" and splits.test is None:
        raise DatasetError("the data has no test set (test_batch); use --split validation")
    dataset, chosen = (
        (splits.test, "test")
        if split in ("auto", "test") and splits.test is not None
        else (splits.validation, "validation")
    )
    report = evaluate_servable(
        servable, dataset, split=chosen, jpeg_qualities=jpeg_qualities, progress=progress
    )
    target = Path(confusion_png) if confusion_png else servable.path / CONFUSION_FILE
    summary = json.dumps(report.to_dict(), indent=2) + "\n"

    def write(directory: Path, confusion_name: str) -> None:
        plot_confusion_matrix(report.confusion_matrix, servable.class_names, confusion_name)
        if report.reliability is not None:
            plot_reliability_diagram(
                report.reliability,
                directory / RELIABILITY_FILE,
                before=report.reliability_uncalibrated,
                temperature=report.temperature,
            )
        (directory / f"evaluation_{report.split}.json").write_text(summary, encoding="utf-8")

    try:
        write(target.parent, str(target))
    except OSError:
        # A read-only export (e.g. mounted into a container): write to the working directory.
        write(Path(), target.name)
    return report
