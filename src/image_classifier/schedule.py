"""The learning-rate schedule, and the time budget that can shorten it mid-run.

The one-cycle schedule ramps the learning rate up over the first ``warmup_fraction`` of the
steps and then down to zero at the last step, so how many steps a run has is part of it. The
same recipe takes 30 minutes on one two-core host and 70 on another, so a fixed number of epochs
cannot promise both a finished schedule and an end time. With a time budget the run measures its
own epochs and, after each, plans how many of the configured ones fit in what is left
(:func:`plan_epochs`); the schedule is then re-planned to end at that epoch, continuing from the
learning rate it has reached (:meth:`OneCycle.replan`), so it always decays to zero at the last
step the run takes instead of being cut off halfway down.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    import keras

# Kept back from a time budget for the work after the last epoch (restoring the best weights,
# fitting the temperature over the validation split, the plots, the export with its check: 20
# to 70 s for the recipe on two cores), Python and TensorFlow starting up, and a last epoch
# up to half an epoch slower than planned (plan_epochs).
FINISH_RESERVE_SECONDS: Final = 150.0
# Epoch times averaged for the plan: the last few, so a host slowing down is followed quickly.
RECENT_EPOCHS: Final = 3


class Replannable(Protocol):
    """A schedule whose end can move while it runs (:func:`one_cycle_schedule`'s)."""

    @property
    def total_steps(self) -> int: ...

    def replan(self, step: int, total_steps: int) -> None: ...


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return max(1, int(total_steps * warmup_fraction))


def one_cycle_schedule(peak: float, total_steps: int, warmup_fraction: float) -> Replannable:
    """Linear warm-up from peak/10 to peak, then linear decay to 0 (a "one-cycle" shape).

    Its shape lives in variables, read at every step, so :meth:`replan` can move the end while
    a compiled training step uses it.
    """
    import keras
    import tensorflow as tf
    from keras import ops

    def variable(value: float, name: str) -> tf.Variable:
        return tf.Variable(float(value), trainable=False, dtype=tf.float32, name=name)

    @keras.saving.register_keras_serializable(package="image_classifier")
    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc]
        def __init__(self) -> None:
            warmup = warmup_steps(total_steps, warmup_fraction)
            self.warmup = variable(warmup, "warmup_steps")
            # The decay is a line from (decay_start, decay_peak) to (end, 0): from the peak at
            # the end of the warm-up, or from wherever a re-plan found the learning rate.
            self.decay_start = variable(warmup, "decay_start")
            self.decay_peak = variable(peak, "decay_peak")
            self.end = variable(total_steps, "end_step")

        def __call__(self, step: Any) -> Any:
            step = ops.cast(step, "float32")
            up = peak * (0.1 + 0.9 * step / self.warmup)
            span = ops.maximum(1.0, self.end - self.decay_start)
            down = self.decay_peak * ops.maximum(0.0, (self.end - step) / span)
            return ops.where(step < self.warmup, up, down)

        @property
        def total_steps(self) -> int:
            return round(float(self.end.numpy()))

        def replan(self, step: int, total_steps: int) -> None:
            """Make ``total_steps`` the last step, ``step`` steps into the run.

            Still warming up: the warm-up is re-planned as its share of the new total (a small
            jump, while the rate is low). Decaying: the decay continues from the rate it has
            reached, a straight line to zero at the new end, without a jump.
            """
            if total_steps <= step:
                return  # the run ends here: no step is left to plan
            if step < float(self.warmup.numpy()):
                warmup = max(step, warmup_steps(total_steps, warmup_fraction))
                self.warmup.assign(float(warmup))
                self.decay_start.assign(float(warmup))
                self.decay_peak.assign(peak)
            else:
                self.decay_peak.assign(float(self(step)))
                self.decay_start.assign(float(step))
            self.end.assign(float(total_steps))

        def get_config(self) -> dict[str, Any]:
            return {
                "peak": peak,
                "total_steps": self.total_steps,
                "warmup": round(float(self.warmup.numpy())),
            }

    return OneCycle()


def epoch_estimate(epoch_seconds: Sequence[float]) -> float:
    """Seconds the next epoch should take: the mean of the last :data:`RECENT_EPOCHS`, leaving
    out the first epoch once there are others (it also builds the training graph)."""
    recent = list(epoch_seconds[1:] or epoch_seconds)[-RECENT_EPOCHS:]
    return sum(recent) / len(recent)


def plan_epochs(
    configured: int, done: int, planned: int, epoch_seconds: Sequence[float], seconds_left: float
) -> int:
    """How many epochs the run should have in all, ``done`` finished and ``planned`` so far.

    The next epochs are assumed to take :func:`epoch_estimate`. The plan moves only when
    it is off by more than half an epoch: epochs of one run differ by 10-30%, and re-planning on
    that noise would bend the schedule every epoch, or end it one epoch early, with the
    learning rate not yet at zero, over a few seconds. Never fewer than ``done`` and never more
    than ``configured``: a budget only shortens a run.
    """
    if not epoch_seconds:
        return configured
    per_epoch = epoch_estimate(epoch_seconds)
    slack = per_epoch / 2
    if per_epoch > 0 and (planned - done) * per_epoch > seconds_left + slack:
        # Late by over half an epoch: shorten.
        planned = done + math.floor(max(0.0, seconds_left) / per_epoch)
    elif per_epoch > 0 and (planned + 1 - done) * per_epoch <= seconds_left - slack:
        # Another epoch fits with half an epoch to spare: lengthen.
        planned = done + math.floor((seconds_left - slack) / per_epoch)
    return max(done, min(configured, planned))


@dataclass
class BudgetReport:
    """What a time budget did to a run, for the model card."""

    minutes: float
    epochs_planned: int
    stopped_early: bool = False

    def to_card(self) -> dict[str, Any]:
        return {
            "minutes": self.minutes,
            "epochs_planned": self.epochs_planned,
            "stopped_early": self.stopped_early,
        }


def time_budget_callback(
    schedule: Replannable,
    *,
    epochs: int,
    steps_per_epoch: int,
    minutes: float,
    started: float,
    clock: Callable[[], float] = time.monotonic,
    report: Callable[[str], None] = print,
) -> tuple[keras.callbacks.Callback, BudgetReport]:
    """A Keras callback holding a run to ``minutes`` counted from ``started`` (``clock``'s time).

    After every epoch it plans the run's length (:func:`plan_epochs`, with
    :data:`FINISH_RESERVE_SECONDS` kept back for the export), re-plans ``schedule`` when that
    changes, and stops training after the last planned epoch. The returned report is filled in
    as the run goes.
    """
    import keras

    deadline = started + minutes * 60.0 - FINISH_RESERVE_SECONDS
    budget = BudgetReport(minutes=minutes, epochs_planned=epochs)

    class TimeBudget(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.last = clock()
            self.seconds: list[float] = []

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            now = clock()
            self.seconds.append(now - self.last)
            self.last = now
            done = epoch + 1
            planned = plan_epochs(epochs, done, budget.epochs_planned, self.seconds, deadline - now)
            if planned != budget.epochs_planned:
                report(
                    # On a line of its own: Keras' progress bar has not ended the epoch's yet.
                    f"\ntime budget: {planned} of {epochs} epochs fit in {minutes:g} min "
                    f"(epochs of about {epoch_estimate(self.seconds):.0f} s); the learning "
                    f"rate now reaches 0 at epoch {planned}"
                )
                schedule.replan(done * steps_per_epoch, planned * steps_per_epoch)
                budget.epochs_planned = planned
            if planned <= done < epochs:
                budget.stopped_early = True
                self.model.stop_training = True

    return TimeBudget(), budget
