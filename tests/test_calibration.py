"""Temperature scaling, ECE and the "not sure" threshold, on numbers whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from image_classifier.calibration import (
    ECE_BINS,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    low_confidence_threshold,
    negative_log_likelihood,
    probabilities_at_temperature_one,
    reliability_bins,
    softmax,
)


def _labels_drawn_from(probabilities: np.ndarray, seed: int) -> np.ndarray:
    """One label per row, drawn from that row's distribution: a perfectly calibrated truth."""
    rng = np.random.default_rng(seed)
    cumulative = probabilities.cumsum(axis=1)
    draws = rng.random((len(probabilities), 1))
    return np.minimum((draws > cumulative).sum(axis=1), probabilities.shape[1] - 1)


def _logits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 3.0, size=(n, 10))


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_temperature: float) -> None:
    logits = _logits(20_000)
    labels = _labels_drawn_from(softmax(logits, true_temperature), seed=1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # It is the minimum: nudging it either way raises the NLL.
    best = negative_log_likelihood(logits, labels, fitted)
    assert best < negative_log_likelihood(logits, labels, fitted * 1.1)
    assert best < negative_log_likelihood(logits, labels, fitted / 1.1)


def test_calibrating_an_overconfident_model_lowers_ece_and_keeps_accuracy() -> None:
    logits = _logits(5000, seed=2)
    labels = _labels_drawn_from(softmax(logits), seed=3)
    overconfident = logits * 3.0  # the same ranking, three times too sure
    result = calibrate(overconfident, labels)
    assert result.temperature == pytest.approx(3.0, rel=0.1)
    assert result.ece_before > 0.1
    assert result.ece_after < result.ece_before / 3
    assert result.nll_after < result.nll_before
    assert result.accuracy == pytest.approx(float(np.mean(logits.argmax(axis=1) == labels)))
    card = result.to_card()
    assert card["ece_bins"] == ECE_BINS == 15
    assert card["temperature"] == round(result.temperature, 4)


def test_ece_is_the_weighted_gap_between_accuracy_and_confidence() -> None:
    # Four predictions at 0.9, two right: one bin, gap 0.4. Four at 0.6, three right: gap 0.15.
    probabilities = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.15
    )
    bins = reliability_bins(probabilities, labels)
    assert bins.counts.sum() == 8 and len(bins.counts) == 15
    assert bins.counts[13] == 4  # 0.9 lies in (13/15, 14/15]
    assert bins.counts[8] == 4  # 0.6 lies in (8/15, 9/15]
    assert np.isnan(bins.accuracy[0])  # empty bins have no accuracy, and add nothing to ECE


def test_ece_of_calibrated_predictions_is_zero() -> None:
    probabilities = np.array([[0.8, 0.2]] * 10)
    labels = np.array([0] * 8 + [1] * 2)  # right 80% of the time at 80% confidence
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_low_confidence_threshold_is_the_largest_below_which_most_answers_are_wrong() -> None:
    confidence = np.array([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95])
    correct = np.array([False, False, True, False, True, True, True])
    rest = np.repeat(((1 - confidence) / 9)[:, None], 9, axis=1)  # ten classes, class 0 on top
    probabilities = np.concatenate([confidence[:, None], rest], axis=1)
    labels = np.where(correct, 0, 1)
    # Below 0.75 five predictions, two right (40%); below 0.875 six, three right (50%: not less).
    assert low_confidence_threshold(probabilities, labels) == pytest.approx(0.75)
    assert low_confidence_threshold(probabilities, np.zeros(7, np.int64)) == 0.0  # always right


def test_low_confidence_threshold_never_splits_equal_confidences() -> None:
    probabilities = np.array([[0.6, 0.4]] * 4 + [[0.9, 0.1]] * 4)
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])  # at 0.6: one right of four
    threshold = low_confidence_threshold(probabilities, labels)
    assert 0.6 < threshold < 0.9  # all four 0.6 predictions are below it, none of the 0.9 ones


def test_uncalibrated_probabilities_are_recovered_from_calibrated_ones() -> None:
    logits = _logits(50, seed=4)
    calibrated = softmax(logits, 0.7).astype(np.float32)  # what a served export returns
    np.testing.assert_allclose(
        probabilities_at_temperature_one(calibrated, 0.7), softmax(logits), atol=1e-5
    )


def test_fitting_on_no_predictions_is_refused() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        fit_temperature(np.zeros((0, 10)), np.zeros(0, np.int64))
