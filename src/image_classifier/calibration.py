"""How far the served probabilities can be trusted: temperature scaling, ECE, the "not sure" line.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T`` before the softmax:
``T`` is fitted on held-out data by minimising the negative log-likelihood, so the top-1
probability comes to match how often the top-1 class is right. A positive ``T`` never changes
which class is on top, so accuracy is untouched. Label smoothing (0.2 in the shipped recipe)
trains a model to be under-confident, so its fitted ``T`` is below 1.

The expected calibration error (ECE) is measured with :data:`ECE_BINS` equal-width bins of the
top-1 probability: the bins' ``|accuracy - mean confidence|``, weighted by the share of
predictions in each.

Only NumPy here: the export computes the logits, this module turns them into figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

ECE_BINS: Final = 15
# Far outside any temperature a trained classifier needs; the fit stops at a bound if the data
# asks for more (a degenerate validation set), instead of running off to 0 or infinity.
TEMPERATURE_BOUNDS: Final = (0.05, 20.0)
# The web page says "not sure" below the threshold: the predictions under it are right less often
# than this.
LOW_CONFIDENCE_ACCURACY: Final = 0.5
LOW_CONFIDENCE_RULE: Final = (
    "the largest t such that validation predictions whose calibrated top-1 probability is below "
    "t are right less than half the time (midway between the two neighbouring confidences); "
    "below it the top-1 class is more likely wrong than right"
)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log(softmax(logits / temperature))`` in float64, stable for large logits."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    result: np.ndarray = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    return result


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    result: np.ndarray = np.exp(log_softmax(logits, temperature))
    return result


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of the true labels under ``softmax(logits / temperature)``."""
    log_probs = log_softmax(logits, temperature)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tolerance: float = 1e-6,
) -> float:
    """The ``T`` in ``bounds`` minimising the NLL, by golden-section search on ``log T``.

    The NLL is convex in ``1 / T`` (a log-sum-exp minus a linear term), hence unimodal in
    ``log T``, so a bracketing search finds the global minimum; one scalar does not need an
    optimisation library. ``tolerance`` is on ``log T`` (relative precision of ``T``).
    """
    if len(labels) == 0:
        raise ValueError("no predictions to fit a temperature on")
    low, high = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, float(np.exp(log_t)))

    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > tolerance:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = low + (1 - ratio) * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(np.exp((low + high) / 2))


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-1 predictions grouped by confidence into equal-width bins over [0, 1]."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,) predictions per bin
    accuracy: np.ndarray  # (bins,) share right per bin; NaN where empty
    confidence: np.ndarray  # (bins,) mean top-1 probability per bin; NaN where empty

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        total = max(int(self.counts.sum()), 1)
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((gaps * self.counts[filled]).sum() / total)


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> ReliabilityBins:
    """Bin ``i`` holds the top-1 probabilities in ``(i / bins, (i + 1) / bins]``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), counts, accuracy, mean_confidence)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    return reliability_bins(probabilities, labels, bins).ece


def low_confidence_threshold(
    probabilities: np.ndarray, labels: np.ndarray, accuracy: float = LOW_CONFIDENCE_ACCURACY
) -> float:
    """:data:`LOW_CONFIDENCE_RULE`: 0.0 when no such threshold exists (never "not sure")."""
    confidence = np.asarray(probabilities, dtype=np.float64).max(axis=1)
    correct = np.asarray(probabilities).argmax(axis=1) == np.asarray(labels)
    order = np.argsort(confidence, kind="stable")
    sorted_conf, sorted_correct = confidence[order], correct[order]
    n = len(sorted_conf)
    if n == 0:
        return 0.0
    below = np.arange(1, n + 1)  # a threshold just above sorted_conf[k - 1] flags k predictions
    share_right = np.cumsum(sorted_correct) / below
    # A threshold can only separate distinct confidences: cut where the next one is larger.
    separable = np.append(sorted_conf[1:] > sorted_conf[:-1], True)
    candidates = np.flatnonzero(separable & (share_right < accuracy))
    if candidates.size == 0:
        return 0.0
    k = int(candidates[-1])
    if k == n - 1:
        return 1.0  # every prediction is more likely wrong than right
    return float((sorted_conf[k] + sorted_conf[k + 1]) / 2)


def probabilities_at_temperature_one(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(z)`` from ``softmax(z / T)``: what a calibrated export's logits give uncalibrated.

    ``log softmax(z / T) = z / T - c``, so ``T * log p`` is ``z`` up to a constant per row, which
    the softmax removes. Lets evaluation report the ECE before calibration from the served
    probabilities alone.
    """
    log_p = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None))
    return softmax(log_p, 1.0 / temperature)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it does on the data it was fitted on."""

    temperature: float
    num_images: int
    ece_before: float  # softmax(logits): the same logits, T = 1
    ece_after: float  # softmax(logits / T)
    nll_before: float
    nll_after: float
    accuracy: float  # argmax of the logits: T does not change it
    low_confidence_threshold: float

    def to_card(self) -> dict[str, Any]:
        return {
            "method": "temperature scaling: probabilities = softmax(logits / T)",
            "temperature": round(self.temperature, 4),
            "fitted_on": f"validation split ({self.num_images} images), minimising the NLL",
            "ece_bins": ECE_BINS,
            "ece_before": round(self.ece_before, 4),
            "ece_after": round(self.ece_after, 4),
            "nll_before": round(self.nll_before, 4),
            "nll_after": round(self.nll_after, 4),
            "low_confidence_threshold": round(self.low_confidence_threshold, 4),
            "low_confidence_rule": LOW_CONFIDENCE_RULE,
        }


def calibrate(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fit ``T`` on ``(logits, labels)`` and measure before and after."""
    labels = np.asarray(labels)
    # Rounded to the precision the model card shows, so the card's number is exactly the one in
    # the graph (and a re-export from the card reproduces it); the NLL is flat at that scale.
    temperature = round(fit_temperature(logits, labels), 4)
    before, after = softmax(logits), softmax(logits, temperature)
    return Calibration(
        temperature=temperature,
        num_images=len(labels),
        ece_before=expected_calibration_error(before, labels),
        ece_after=expected_calibration_error(after, labels),
        nll_before=negative_log_likelihood(logits, labels, 1.0),
        nll_after=negative_log_likelihood(logits, labels, temperature),
        accuracy=float(np.mean(np.argmax(logits, axis=1) == labels)),
        low_confidence_threshold=low_confidence_threshold(after, labels),
    )
