"""The one-cycle learning-rate schedule and the time budget that re-plans it."""

from __future__ import annotations

import numpy as np
import pytest

from image_classifier.schedule import (
    FINISH_RESERVE_SECONDS,
    plan_epochs,
    time_budget_callback,
    warmup_steps,
)

tf = pytest.importorskip("tensorflow", reason="the schedule is a Keras schedule")
keras = pytest.importorskip("keras")

from image_classifier.schedule import one_cycle_schedule  # noqa: E402


def _rates(schedule: object, steps: range) -> np.ndarray:
    return np.array([float(schedule(step)) for step in steps])  # type: ignore[operator]


def _one_cycle(step: int, peak: float, total: int, warmup: int) -> float:
    """The schedule's shape written out: up from peak/10 to peak, then down to 0 at ``total``."""
    if step < warmup:
        return peak * (0.1 + 0.9 * step / warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def test_an_unplanned_schedule_is_the_one_cycle_shape() -> None:
    schedule = one_cycle_schedule(0.3, 100, 0.2)
    expected = [_one_cycle(step, 0.3, 100, 20) for step in range(110)]
    np.testing.assert_allclose(_rates(schedule, range(110)), expected, rtol=1e-6, atol=1e-7)
    assert schedule.total_steps == 100
    assert _rates(schedule, range(19, 21)).tolist() == pytest.approx([0.2865, 0.3])


def test_replanning_while_decaying_continues_from_the_current_rate_to_zero_at_the_new_end() -> None:
    schedule = one_cycle_schedule(0.3, 100, 0.2)
    before = float(schedule(50))
    schedule.replan(50, 70)

    rates = _rates(schedule, range(45, 75))
    # The steps already taken are untouched (they are in the past anyway), the next one is where
    # the old line was, and from there a straight line reaches 0 at step 70.
    assert float(schedule(50)) == pytest.approx(before)
    np.testing.assert_allclose(rates[5:26], np.linspace(before, 0.0, 21), rtol=1e-5, atol=1e-6)
    assert rates[25:].max() == 0.0
    assert schedule.total_steps == 70
    # Never a jump: neighbouring steps differ by at most the steeper slope.
    assert np.abs(np.diff(rates)).max() <= before / 20 + 1e-6


def test_replanning_during_the_warmup_rescales_it_to_the_new_total() -> None:
    schedule = one_cycle_schedule(0.3, 100, 0.2)
    schedule.replan(5, 60)  # the warm-up becomes 20% of 60 steps

    assert warmup_steps(60, 0.2) == 12
    expected = [_one_cycle(step, 0.3, 60, 12) for step in range(5, 70)]
    np.testing.assert_allclose(_rates(schedule, range(5, 70)), expected, rtol=1e-6, atol=1e-7)


def test_a_plan_that_ends_where_the_run_is_changes_nothing() -> None:
    schedule = one_cycle_schedule(0.3, 100, 0.2)
    before = _rates(schedule, range(100))
    schedule.replan(40, 40)
    np.testing.assert_array_equal(_rates(schedule, range(100)), before)


@pytest.mark.parametrize(
    ("done", "seconds", "planned", "left", "expected"),
    [
        (0, [], 30, 10.0, 30),  # nothing measured yet: the configured run
        (1, [100.0], 30, 450.0, 5),  # 1 done + 4 more of 100 s
        (2, [160.0, 100.0], 30, 450.0, 6),  # the first epoch (it builds the graph) is left out
        (5, [160.0, 100.0, 100.0, 130.0, 100.0], 30, 330.0, 8),  # the last three: 110 s each
        (4, [100.0] * 4, 8, 360.0, 8),  # 40 s late, under half an epoch: the plan stands
        (4, [100.0] * 4, 8, 340.0, 7),  # 60 s late: one epoch fewer
        (4, [100.0] * 4, 6, 340.0, 6),  # a 7th would leave 40 s, under half an epoch: as planned
        (4, [100.0] * 4, 6, 460.0, 8),  # room for more with half an epoch to spare
        (3, [100.0] * 3, 30, 10_000.0, 30),  # never more than configured
        (3, [100.0] * 3, 5, 50.0, 3),  # never fewer than done
        (3, [100.0] * 3, 3, -500.0, 3),  # already late: stop now
    ],
)
def test_plan_epochs(
    done: int, seconds: list[float], planned: int, left: float, expected: int
) -> None:
    assert plan_epochs(30, done, planned, seconds, left) == expected


def test_noisy_epochs_move_the_plan_only_early() -> None:
    """Epoch times of a real run of the recipe (seconds, two EPYC cores) against a 28-minute
    budget: the plan settles within a few epochs instead of following every slow one."""
    seconds = [73, 80, 84, 72, 71, 67, 65, 66, 68, 65, 64, 69, 70, 66, 66, 64, 68, 80, 92, 81, 78]
    deadline, elapsed, planned, changes = 28 * 60 - FINISH_RESERVE_SECONDS, 0.0, 30, []
    for done in range(1, len(seconds) + 1):
        elapsed += seconds[done - 1]
        new = plan_epochs(30, done, planned, seconds[:done], deadline - elapsed)
        if new != planned:
            changes.append(done)
            planned = new
        if planned <= done:
            break
    assert done == planned == 21 and elapsed + FINISH_RESERVE_SECONDS / 2 < 28 * 60
    assert max(changes) <= 8, changes


class _Clock:
    """Time that passes only when the test says so: each epoch takes what the test decides."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_callback_shortens_the_run_and_its_schedule() -> None:
    """Keras' fit with the callback: epochs of 100 s against a budget that holds 5 of 10."""
    clock = _Clock()
    steps_per_epoch, epochs = 4, 10
    schedule = one_cycle_schedule(0.1, steps_per_epoch * epochs, 0.2)
    minutes = (5 * 100.0 + 50.0 + FINISH_RESERVE_SECONDS) / 60  # five epochs and change
    messages: list[str] = []
    callback, report = time_budget_callback(
        schedule,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        minutes=minutes,
        started=clock.now,
        clock=clock,
        report=messages.append,
    )

    class Tick(keras.callbacks.Callback):  # type: ignore[misc]
        # Runs before the budget's own epoch end: every epoch lasts 100 s of the test's clock.
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            clock.now += 100.0

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x = np.ones((steps_per_epoch * 8, 3), np.float32)
    history = model.fit(
        x,
        np.zeros((len(x), 1), np.float32),
        batch_size=8,
        epochs=epochs,
        verbose=0,
        callbacks=[Tick(), callback],
    )

    assert len(history.history["loss"]) == 5
    assert report.epochs_planned == 5 and report.stopped_early
    assert report.to_card() == {"minutes": minutes, "epochs_planned": 5, "stopped_early": True}
    assert messages and "5 of 10 epochs" in messages[0]
    # The schedule ended where the run did: the last step ran at a small rate, the next is 0.
    assert schedule.total_steps == 5 * steps_per_epoch
    assert int(model.optimizer.iterations) == 5 * steps_per_epoch
    assert float(schedule(5 * steps_per_epoch - 1)) > 0
    assert float(schedule(5 * steps_per_epoch)) == 0.0


def test_a_budget_the_run_fits_in_changes_nothing() -> None:
    clock = _Clock()
    schedule = one_cycle_schedule(0.1, 12, 0.2)
    callback, report = time_budget_callback(
        schedule, epochs=3, steps_per_epoch=4, minutes=60, started=clock.now, clock=clock
    )
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    history = model.fit(
        np.ones((32, 3), np.float32),
        np.zeros((32, 1), np.float32),
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[callback],
    )
    assert len(history.history["loss"]) == 3
    assert report.epochs_planned == 3 and not report.stopped_early
    assert schedule.total_steps == 12
