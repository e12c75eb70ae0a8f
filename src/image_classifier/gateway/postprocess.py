"""From the model's probabilities to what a client reads: labels, most probable first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from image_classifier.gateway.schemas import ClassPrediction


def top_k(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[ClassPrediction]:
    """The ``k`` most probable classes of one image's probabilities."""
    # Stable sort on the negated scores: ties keep class order, so answers are reproducible.
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        ClassPrediction(
            label=class_names[i], class_index=int(i), probability=float(probabilities[i])
        )
        for i in order
    ]


def class_names_from_card(card: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The labels a model card (an export's metadata.json) lists, if it lists usable ones."""
    names = card.get("class_names") if card else None
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None
