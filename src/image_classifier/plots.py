"""PNG figures written next to an export: training curves and the confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    history: Mapping[str, Sequence[float]], path: str | os.PathLike[str]
) -> None:
    """Loss and accuracy per epoch, training and validation side by side."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        if history.get(key):
            ax_loss.plot(epochs[: len(history[key])], history[key], label=label)
    for key, label in (("accuracy", "train"), ("val_accuracy", "validation")):
        if history.get(key):
            ax_acc.plot(epochs[: len(history[key])], history[key], label=label)
    ax_loss.set(title="Loss", xlabel="epoch")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike[str]
) -> None:
    """Row-normalized confusion matrix (rows: true class), counts printed in each cell."""
    plt = _pyplot()
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    normalized = matrix / totals
    size = max(6, len(class_names) * 0.7)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if normalized[i, j] > 0.5 else "black"
            ax.text(
                j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour, fontsize=8
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
