"""PNG figures written next to an export: training curves, confusion matrix, reliability."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from image_classifier.calibration import ReliabilityBins


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


def plot_reliability_diagram(
    bins: ReliabilityBins,
    path: str | os.PathLike[str],
    *,
    before: ReliabilityBins | None = None,
    temperature: float | None = None,
) -> None:
    """Accuracy against top-1 probability per confidence bin (a calibrated model sits on the
    diagonal), with ``before`` (uncalibrated) as a line, and how many predictions each bin holds.
    """
    plt = _pyplot()
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = float(bins.edges[1] - bins.edges[0])
    centres = bins.edges[:-1] + width / 2
    filled = bins.counts > 0
    after_label = "served" if temperature is None else f"served (T = {temperature:g})"
    ax.bar(
        centres[filled],
        bins.accuracy[filled],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.8,
        label=f"{after_label}, ECE {bins.ece:.3f}",
    )
    if before is not None:
        shown = before.counts > 0
        ax.plot(
            before.confidence[shown],
            before.accuracy[shown],
            "o-",
            color="tab:orange",
            label=f"before calibration (T = 1), ECE {before.ece:.3f}",
        )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax_count.bar(centres, bins.counts, width=width * 0.9, color="tab:blue", alpha=0.8)
    ax_count.set(xlabel="top-1 probability", ylabel="predictions", yscale="log")
    ax_count.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
