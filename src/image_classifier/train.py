"""Train the TCN classifier and export it for TensorFlow Serving.

One story, top to bottom: load data -> split -> build model -> compile (SGD + one-cycle LR,
decoupled weight decay, label smoothing) -> fit with best-checkpointing -> restore best ->
fit the temperature on the validation split -> export (atomic, next version, calibrated) with
history, curves and the model card.

Ctrl-C during ``fit`` stops training cleanly: the best checkpoint so far is restored and exported.

The same story runs on several devices or machines (``distribute``): ``"mirrored"`` is Keras'
``fit`` under ``tf.distribute.MirroredStrategy`` (the local GPUs); ``"multi-worker"`` is
``tf.distribute.MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``. Keras 3's ``fit``
fails under that strategy (keras-team/keras#20585: it cannot convert the per-replica batches it is
given), so there :func:`_fit_multi_worker` steps through ``strategy.run`` itself, with the same
model, optimizer and schedule, the same input pipeline (sharded per worker) and the same Keras
callbacks; only the chief exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from image_classifier.constants import (
    CURVES_FILE,
    DEFAULT_MODEL_BASE_PATH,
    HISTORY_FILE,
    INPUT_SHAPE,
    MODEL_NAME,
)
from image_classifier.data import (
    AUGMENT_PADDING,
    DEFAULT_VALIDATION_SIZE,
    Dataset,
    DataSplits,
    JpegAugment,
    Shard,
    channel_stats,
    load_splits,
    make_tf_dataset,
    replica_batch_size,
    sharded_steps_per_epoch,
)
from image_classifier.errors import ConfigError
from image_classifier.model import (
    ModelConfig,
    build_model,
    check_config_keys,
    count_flops,
    flops_by_part,
    init_whitening,
    parameters_by_part,
    receptive_field,
    sequence_length,
)
from image_classifier.schedule import (
    BudgetReport,
    Replannable,
    one_cycle_schedule,
    time_budget_callback,
)

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# How training is spread: one process on its default device, Keras' fit over the local devices
# (MirroredStrategy), or several processes over TF_CONFIG's cluster (MultiWorkerMirroredStrategy).
Distribute = Literal["none", "mirrored", "multi-worker"]
DISTRIBUTE_MODES: Final[tuple[Distribute, ...]] = get_args(Distribute)
TF_CONFIG_ENV: Final = "TF_CONFIG"
# The task types MultiWorkerMirroredStrategy runs; "ps" and "evaluator" belong to other strategies.
_MWMS_TASK_TYPES: Final = ("chief", "worker")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters (the architecture lives in :class:`ModelConfig`)."""

    epochs: int = 16
    batch_size: int = 512
    # Peak learning rate for SGD-Nesterov at batch 512; scaled linearly for other batch sizes.
    learning_rate: float = 0.3
    warmup_fraction: float = 0.2  # share of all steps spent ramping up from lr/10 to lr
    momentum: float = 0.9
    # Decoupled: each step multiplies every weight (normalization scales included) by
    # (1 - lr * weight_decay). 5e-3 beat 5e-4 and 2e-3 in the recipe search.
    weight_decay: float = 5e-3
    # Learning-rate multiplier for the normalization layers' biases (airbench trains them at
    # 64x). Applied to their gradients: with SGD and momentum that scales their steps and
    # leaves their decoupled decay (lr * weight_decay per step) as it is, as airbench does.
    norm_bias_lr_scale: float = 1.0
    label_smoothing: float = 0.2
    early_stopping_patience: int | None = None  # epochs without val-accuracy gain; None = off
    validation_size: int = DEFAULT_VALIDATION_SIZE
    seed: int = 0
    # bfloat16 compute (float32 weights) uses the CPU's AMX/AVX-512 BF16 units where present.
    precision: Literal["float32", "mixed_bfloat16"] = "mixed_bfloat16"
    flip_tta: bool = True  # export averages the image and its mirror
    # Share of training images re-encoded as JPEG at a random quality in [min, max] (data.py's
    # JpegAugment); 0 turns it off, as it was when the shipped weights were trained.
    jpeg_augment_probability: float = 0.5
    jpeg_quality_min: int = 50
    jpeg_quality_max: int = 95
    # > 0: every batch holds batch_size / 2 images twice, as augmented and re-encoded as JPEG
    # (jpeg_augment_probability then does not apply), and the loss adds this weight times how
    # far the JPEG's predicted distribution is from the clean one's (jpeg_consistency_loss):
    # a model taught to answer a JPEG as it answers the picture, not only to label it.
    jpeg_consistency: float = 0.0
    # Random crops of the reflect-padded image shift it by up to this many pixels. Short runs
    # fit better with less (airbench uses 2).
    crop_padding: int = AUGMENT_PADDING
    # Fit a temperature on the validation split after training and export it calibrated.
    calibrate: bool = True
    # Lookahead (Zhang et al. 2019) on airbench's schedule: every LOOKAHEAD_EVERY steps the
    # weights and normalization statistics are pulled into a slow copy, which they then take.
    lookahead: bool = False
    # Wall-clock minutes for the whole run, from loading the data to the export (None: no
    # limit). After every epoch the run plans how many of ``epochs`` fit, and re-plans the
    # learning-rate schedule to end there (schedule.py): a budget only ever shortens a run.
    time_budget_minutes: float | None = None
    verbose: int = 1

    def __post_init__(self) -> None:
        self.jpeg_augment()  # validates the JPEG settings when the config is made
        if not self.norm_bias_lr_scale > 0:
            raise ConfigError(f"norm_bias_lr_scale must be positive, got {self.norm_bias_lr_scale}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.crop_padding < 32:
            raise ConfigError(f"crop_padding must be in [0, 32), got {self.crop_padding}")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ConfigError(
                f"time_budget_minutes must be positive (or null: no limit), got "
                f"{self.time_budget_minutes}"
            )
        if not self.jpeg_consistency >= 0:
            raise ConfigError(f"jpeg_consistency must be >= 0, got {self.jpeg_consistency}")
        if self.jpeg_consistency and self.batch_size % 2:
            raise ConfigError(
                f"jpeg_consistency pairs every image in its batch: batch_size {self.batch_size} "
                "must be even"
            )

    def jpeg_augment(self) -> JpegAugment | None:
        if self.jpeg_consistency:
            # Pairs re-encode every second view; the quality range still applies.
            return JpegAugment(1.0, self.jpeg_quality_min, self.jpeg_quality_max)
        if self.jpeg_augment_probability == 0:
            return None
        return JpegAugment(
            self.jpeg_augment_probability, self.jpeg_quality_min, self.jpeg_quality_max
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        check_config_keys(cls, values, "train")
        return cls(**values)


def load_configs(
    config_file: str | os.PathLike[str] | None = None,
    *,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The configs from a JSON file ``{"model": {...}, "train": {...}}``, then the overrides.

    Raises :class:`~image_classifier.errors.ConfigError` for an unreadable file, invalid JSON
    or an unknown key, so ``train --config`` reports a mistake in one line.
    """
    file_values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            file_values = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(file_values, dict) or not set(file_values) <= {"model", "train"}:
            raise ConfigError(f'{path} must be a JSON object with "model" and/or "train" keys')
    sections = {}
    for key, overrides in (("model", model_overrides), ("train", train_overrides)):
        section = file_values.get(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f'"{key}" in {config_file} must be a JSON object')
        sections[key] = {**section, **(overrides or {})}
    model_config = ModelConfig.from_dict({**ModelConfig().to_dict(), **sections["model"]})
    return model_config, TrainConfig.from_dict(sections["train"])


@dataclass
class TrainResult:
    export_dir: Path | None  # None on a multi-worker run's non-chief workers, which do not export
    history: dict[str, list[float]]
    best_val_accuracy: float
    epochs_run: int
    training_seconds: float
    interrupted: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    # Set when the time budget ended the run before its configured epochs.
    stopped_by_time_budget: bool = False


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker cluster, as ``TF_CONFIG`` describes it."""

    task_type: str  # "chief" or "worker"
    task_index: int
    num_workers: int  # every task that trains, the chief included
    worker_id: int  # 0 .. num_workers - 1, chief first: TensorFlow's own numbering
    is_chief: bool  # the one task that writes the export


def parse_tf_config(text: str | None) -> WorkerRole:
    """Read ``TF_CONFIG`` (``{"cluster": {...}, "task": {"type": ..., "index": ...}}``).

    Checked here, before TensorFlow sees it, so a mistake is one line naming what is wrong
    rather than a stack trace from the strategy, or a worker waiting forever for a peer that
    was never described. Without a ``chief`` task, worker 0 is the chief (TensorFlow's rule).
    """
    example = (
        '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", '
        '"index": 0}}'
    )
    if not text or not text.strip():
        raise ConfigError(
            f"--distribute multi-worker needs {TF_CONFIG_ENV} in the environment, e.g. {example}"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{TF_CONFIG_ENV} is not valid JSON: {exc}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict):
        raise ConfigError(f"{TF_CONFIG_ENV} must look like {example}")
    unsupported = sorted(set(cluster) - set(_MWMS_TASK_TYPES))
    if unsupported:
        raise ConfigError(
            f"{TF_CONFIG_ENV} cluster has {unsupported}: multi-worker training runs only "
            f"{' and '.join(_MWMS_TASK_TYPES)} tasks"
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)
        ):
            raise ConfigError(
                f'{TF_CONFIG_ENV} cluster "{job}" must be a non-empty list of "host:port" strings'
            )
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"{TF_CONFIG_ENV} cluster may have one chief, not several")
    task_type, task_index = task.get("type"), task.get("index")
    if not isinstance(task_type, str) or task_type not in cluster:
        raise ConfigError(
            f"{TF_CONFIG_ENV} task type {task_type!r} is not in the cluster ({sorted(cluster)})"
        )
    if (
        not isinstance(task_index, int)
        or isinstance(task_index, bool)
        or not 0 <= task_index < len(cluster[task_type])
    ):
        raise ConfigError(
            f"{TF_CONFIG_ENV} task index {task_index!r} is not one of the "
            f"{len(cluster[task_type])} {task_type} tasks"
        )
    has_chief = "chief" in cluster
    worker_id = 0 if task_type == "chief" else task_index + int(has_chief)
    return WorkerRole(
        task_type=str(task_type),
        task_index=task_index,
        num_workers=len(cluster.get("chief", [])) + len(cluster.get("worker", [])),
        worker_id=worker_id,
        is_chief=worker_id == 0,
    )


def check_distribute(mode: str) -> WorkerRole | None:
    """Validate ``--distribute`` (and ``TF_CONFIG`` for multi-worker) without starting TensorFlow.

    Callers run this before loading data, so a misconfigured worker fails in a second.
    """
    if mode not in DISTRIBUTE_MODES:
        raise ConfigError(f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}, got {mode!r}")
    if mode == "multi-worker":
        return parse_tf_config(os.environ.get(TF_CONFIG_ENV))
    return None


@dataclass(frozen=True)
class _Plan:
    """How this process trains: the strategy, and for multi-worker runs its role."""

    mode: Distribute
    strategy: tf.distribute.Strategy
    role: WorkerRole | None

    @property
    def is_chief(self) -> bool:
        return self.role is None or self.role.is_chief


def _make_plan(mode: Distribute) -> _Plan:
    """Create the strategy. Call before any other TensorFlow op: MultiWorkerMirroredStrategy
    configures collective ops when TensorFlow's runtime starts, and refuses afterwards."""
    import tensorflow as tf

    role = check_distribute(mode)
    if mode == "none":
        return _Plan(mode, tf.distribute.get_strategy(), None)
    if mode == "mirrored":
        return _Plan(mode, tf.distribute.MirroredStrategy(), None)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as exc:
        # E.g. TensorFlow was already initialised in this process (collectives come too late).
        raise ConfigError(f"cannot start multi-worker training: {exc}") from None
    return _Plan(mode, strategy, role)


def configure_threads() -> int:
    """Use every core for ops and keep a few ops in flight; returns the core count."""
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass  # already initialised in this process (tests); the settings then stand as they are
    return cores


# airbench's Lookahead: every LOOKAHEAD_EVERY steps, slow = decay * slow + (1 - decay) * weights,
# then the weights become the slow copy. decay ramps up as LOOKAHEAD_DECAY * (step / total) ** 3
# (no pull early in training, when the weights move fast); the last step ends on the copy.
LOOKAHEAD_EVERY: Final = 5
LOOKAHEAD_DECAY: Final = 0.95**5


def lookahead_decay(step: int, total_steps: int) -> float:
    """The slow copy's share at ``step`` (1-based) of ``total_steps``; 1 at the last step."""
    if step >= total_steps:
        return 1.0
    return float(LOOKAHEAD_DECAY * (step / total_steps) ** 3)


def lookahead_callback(total_steps: int | Callable[[], int]) -> keras.callbacks.Callback:
    """Keras callback applying :func:`lookahead_decay`'s Lookahead to the model it trains.

    ``total_steps`` is the run's length, or a function giving it (read at every step: a time
    budget can shorten the run while it trains).

    The slow copy covers the trainable weights and the normalization layers' moving statistics
    (as airbench's covers its buffers), so the weights the run ends with and the statistics they
    are evaluated with come from the same average; frozen layers (the whitening, the input
    standardization) are left exactly as they are. Keras runs a batch's callbacks before the
    epoch's validation, so the last step's pull is what the last epoch is scored and saved as.
    """
    import keras
    import tensorflow as tf

    class Lookahead(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.step = 0
            self.fast = list(self.model.trainable_weights) + [
                weight
                for layer in self.model.layers
                if isinstance(layer, keras.layers.BatchNormalization)
                for weight in layer.non_trainable_weights
            ]
            self.slow = [tf.Variable(tf.convert_to_tensor(v), trainable=False) for v in self.fast]

            @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
            def pull(decay: tf.Tensor) -> None:
                for fast, slow in zip(self.fast, self.slow, strict=True):
                    slow.assign(decay * slow + (1.0 - decay) * fast.value)
                    fast.assign(slow)

            self.pull = pull

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.step += 1
            total = total_steps() if callable(total_steps) else total_steps
            if self.step % LOOKAHEAD_EVERY == 0 or self.step == total:
                self.pull(tf.constant(lookahead_decay(self.step, total), tf.float32))

    return Lookahead()


def training_loss(config: TrainConfig, *, reduction: str = "sum_over_batch_size") -> Any:
    """The loss both training engines minimise: cross-entropy on logits, label smoothing
    (with ``jpeg_consistency``, :func:`jpeg_consistency_loss`'s)."""
    import keras

    if config.jpeg_consistency:
        return jpeg_consistency_loss(config, reduction=reduction)
    return keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=config.label_smoothing, reduction=reduction
    )


def jpeg_consistency_loss(config: TrainConfig, *, reduction: str = "sum_over_batch_size") -> Any:
    """Cross-entropy on every view plus ``config.jpeg_consistency`` x KL(clean || JPEG).

    The batch is ``training_batches``' pairs: the first half clean crops, the second half the
    same crops as JPEGs. The clean prediction is the target (no gradient flows into it), so
    the term moves how the model answers a JPEG towards how it answers the picture and leaves
    what it learns from clean pixels to the cross-entropy: a JPEG should be read, not merely
    labelled, as its source is. Each view's loss carries its pair's divergence, so the mean
    over the batch is mean cross-entropy + weight x mean divergence.
    """
    import keras
    from keras import ops

    weight, smoothing = config.jpeg_consistency, config.label_smoothing

    class JpegConsistencyLoss(keras.losses.Loss):  # type: ignore[misc]
        def call(self, y_true: Any, y_pred: Any) -> Any:
            cross_entropy = keras.losses.categorical_crossentropy(
                y_true, y_pred, from_logits=True, label_smoothing=smoothing
            )
            clean, coded = ops.split(y_pred, 2, axis=0)
            log_target = ops.log_softmax(ops.stop_gradient(clean), axis=-1)
            divergence = ops.sum(
                ops.exp(log_target) * (log_target - ops.log_softmax(coded, axis=-1)), axis=-1
            )
            return cross_entropy + weight * ops.concatenate([divergence, divergence], axis=0)

    return JpegConsistencyLoss(name="jpeg_consistency_loss", reduction=reduction)


def norm_bias_paths(model: keras.Model) -> frozenset[str]:
    """Variable paths of the normalization layers' learned biases (``beta``)."""
    import keras

    norms = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
    return frozenset(
        layer.beta.path
        for layer in model.layers
        if isinstance(layer, norms) and layer.center and layer.trainable
    )


def gradient_scaled_sgd(scales: Mapping[str, float], **kwargs: Any) -> keras.optimizers.SGD:
    """Keras' SGD, the gradient of each variable whose path is in ``scales`` multiplied by its
    factor before the update: a per-variable learning rate that leaves weight decay alone."""
    import keras

    class GradientScaledSGD(keras.optimizers.SGD):  # type: ignore[misc]
        def apply(self, grads: list[Any], trainable_variables: Any = None) -> Any:
            if trainable_variables is None and not self.built:
                return super().apply(grads, trainable_variables)  # Keras' own error
            variables = (
                self._trainable_variables
                if trainable_variables is None
                else list(trainable_variables)
            )
            grads = [
                grad if grad is None or var.path not in scales else grad * scales[var.path]
                for grad, var in zip(grads, variables, strict=True)
            ]
            return super().apply(grads, trainable_variables)

    return GradientScaledSGD(**kwargs)


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int) -> Replannable:
    """Compile ``model`` for ``config``'s optimisation; returns its learning-rate schedule."""
    import keras

    peak = config.learning_rate * config.batch_size / 512
    schedule = one_cycle_schedule(peak, steps_per_epoch * config.epochs, config.warmup_fraction)
    settings: dict[str, Any] = {
        "learning_rate": schedule,
        "momentum": config.momentum,
        "nesterov": True,
        "weight_decay": config.weight_decay,
    }
    if config.norm_bias_lr_scale == 1:
        optimizer = keras.optimizers.SGD(**settings)
    else:
        scales = dict.fromkeys(norm_bias_paths(model), config.norm_bias_lr_scale)
        optimizer = gradient_scaled_sgd(scales, **settings)
    # The input standardization's fixed statistics are not weights to shrink.
    optimizer.exclude_from_weight_decay(var_names=["standardize"])
    model.compile(
        optimizer=optimizer,
        loss=training_loss(config),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return schedule


def hardware_description() -> dict[str, Any]:
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def train(
    data: DataSplits,
    *,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    model_base_path: str | os.PathLike[str] = DEFAULT_MODEL_BASE_PATH,
    version: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    distribute: Distribute = "none",
    started: float | None = None,
) -> TrainResult:
    """Fit a model on ``data.train``, select on ``data.validation``, export the best epoch.

    ``callbacks`` are extra Keras callbacks (progress reporting, tests interrupting a run).
    ``distribute`` spreads the training (module docstring); the global batch size and the
    learning-rate schedule stay as configured whatever the number of replicas. In a
    multi-worker run every worker trains and checkpoints (non-chief workers under
    ``<run_dir>/worker-<id>/``), and only the chief exports. ``started`` is the
    ``time.monotonic()`` the time budget counts from (default: now; :func:`train_from_dir`
    passes when it began loading the data).
    """
    import keras

    from image_classifier.constants import DEFAULT_WEIGHT_STORAGE
    from image_classifier.export import (
        calibrated_answers_check,
        calibrated_metrics,
        export_model,
        fit_calibration,
    )
    from image_classifier.plots import plot_training_curves

    train_config = train_config or TrainConfig()
    model_config = model_config or ModelConfig()
    if train_config.lookahead and distribute != "none":
        # Its callback assigns the model's variables between steps, outside the replicas.
        raise ConfigError("lookahead trains in one process only (distribute 'none')")
    if train_config.time_budget_minutes is not None and distribute == "multi-worker":
        # Each worker would time its own epochs, and workers that planned different ends would
        # wait for each other's steps forever.
        raise ConfigError(
            "time_budget_minutes trains in one process only (distribute 'none' or 'mirrored')"
        )
    started = time.monotonic() if started is None else started
    if train_config.jpeg_consistency and distribute != "none":
        # Its loss pairs the two halves of a batch; replicas would each hold a slice of one.
        raise ConfigError("jpeg_consistency trains in one process only (distribute 'none')")
    class_names = data.train.class_names
    mean, std = channel_stats(data.train.images)  # three channels each
    model_config = dataclasses.replace(
        model_config,
        num_classes=len(class_names),
        mean=(mean[0], mean[1], mean[2]),
        std=(std[0], std[1], std[2]),
    )

    cores = configure_threads()
    plan = _make_plan(distribute)  # first: nothing may start TensorFlow's runtime before it
    multi_worker = plan.role is not None
    if plan.role is not None:
        # Checked before any work: the global batch must split evenly over every replica.
        replica_batch_size(
            train_config.batch_size,
            Shard(0, plan.role.num_workers, _replicas_per_worker(plan)),
        )
        steps_per_epoch = sharded_steps_per_epoch(len(data.train), train_config.batch_size)
    else:
        steps_per_epoch = math.ceil(len(data.train) / train_config.batch_size)

    keras.utils.set_random_seed(train_config.seed)
    with plan.strategy.scope():
        # Variables (model and optimizer) belong to the strategy: mirrored on every replica.
        keras.mixed_precision.set_global_policy(train_config.precision)
        try:
            model = build_model(model_config)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        init_whitening(model, data.train.images, model_config)
        schedule = compile_model(model, train_config, steps_per_epoch)

    run_path = Path(run_dir) if run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if plan.role is not None and not plan.role.is_chief:
        # Workers checkpoint too (they pick the same epochs), each in its own directory, so
        # workers sharing a volume never write the same file.
        run_path = run_path / f"worker-{plan.role.worker_id}"
    run_path.mkdir(parents=True, exist_ok=True)
    best_weights = run_path / "best.weights.h5"
    all_callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.ModelCheckpoint(
            str(best_weights),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
        ),
    ]
    budget: BudgetReport | None = None
    if train_config.time_budget_minutes is not None:
        budget_callback, budget = time_budget_callback(
            schedule,
            epochs=train_config.epochs,
            steps_per_epoch=steps_per_epoch,
            minutes=train_config.time_budget_minutes,
            started=started,
            report=print if train_config.verbose else lambda _: None,
        )
        all_callbacks.append(budget_callback)
    if train_config.lookahead:
        # Its last pull lands on the schedule's last step, wherever a time budget moves it.
        all_callbacks.append(lookahead_callback(lambda: schedule.total_steps))
    if train_config.early_stopping_patience:
        all_callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=train_config.early_stopping_patience
            )
        )
    (run_path / "config.json").write_text(
        json.dumps(
            {
                "model": model_config.to_dict(),
                "train": train_config.to_dict(),
                "distribute": _distribution_card(plan),
            },
            indent=2,
        ),
        encoding="utf-8",
    )

    history: dict[str, list[float]] = {}
    # Extra callbacks run last, so an interruption they raise finds this epoch already saved.
    all_callbacks += [_history_recorder(history), *callbacks]
    interrupted = False
    started = time.perf_counter()
    try:
        if multi_worker:
            _fit_multi_worker(model, plan, data, train_config, steps_per_epoch, all_callbacks)
        else:
            num_classes = len(class_names)
            train_ds = training_batches(data.train, train_config)
            val_ds = make_tf_dataset(
                data.validation, batch_size=train_config.batch_size, training=False
            ).map(lambda x, y: (x, _one_hot(y, num_classes)))
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=train_config.epochs,
                # With an endless dataset and the epoch's length given, Keras keeps one
                # iterator for the whole run instead of opening one (and a spare) per epoch.
                steps_per_epoch=steps_per_epoch,
                callbacks=all_callbacks,
                verbose=train_config.verbose,
                shuffle=False,  # the tf.data pipeline shuffles
            )
    except KeyboardInterrupt:
        if multi_worker:
            # One worker cannot stop alone: the others wait in a collective for its next step.
            # It exits (status 130) and the cluster's failure handling ends the rest.
            raise
        interrupted = True
        print("\ninterrupted: exporting the best checkpoint so far", flush=True)
    training_seconds = time.perf_counter() - started

    if not best_weights.exists():
        raise KeyboardInterrupt("interrupted before the first epoch finished; nothing to export")
    best_val = max(history.get("val_accuracy", [float("nan")]))
    if not plan.is_chief:
        _wait_for_every_worker(plan)
        return TrainResult(
            export_dir=None,
            history=history,
            best_val_accuracy=float(best_val),
            epochs_run=len(history.get("loss", [])),
            training_seconds=training_seconds,
            interrupted=interrupted,
        )
    if plan.mode != "none":
        # The export is built from a plain copy outside the strategy: saving or evaluating
        # distributed variables could start collectives the finished workers never join.
        model = build_model(model_config)
    model.load_weights(str(best_weights))
    # Fitted, and checked below, on the weights as the export stores them (rounded to float16).
    calibration, val_logits = fit_calibration(
        model,
        model_config,
        data.validation,
        flip_tta=train_config.flip_tta,
        weight_storage=DEFAULT_WEIGHT_STORAGE,
    )
    # Uncalibrated is T = 1 of the same contract (views averaged as logits), so every figure
    # below describes what the export serves either way.
    temperature = calibration.temperature if train_config.calibrate else 1.0

    history_file = run_path / HISTORY_FILE
    history_file.write_text(json.dumps(history, indent=2), encoding="utf-8")
    curves_file = run_path / CURVES_FILE
    plot_training_curves(history, curves_file)

    metadata: dict[str, Any] = {
        "name": MODEL_NAME,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": {
            "type": _architecture_type(model_config),
            "sequence_length": sequence_length(model_config),
            "receptive_field": receptive_field(model_config) if model_config.tcn else None,
            "parameters": int(model.count_params()),
            "flops_per_image": count_flops(model) * (2 if train_config.flip_tta else 1),
            # One forward pass each, so the shares hold with or without flip averaging.
            "flops_by_part": flops_by_part(model),
            "parameters_by_part": parameters_by_part(model),
        },
        "input": {
            "dtype": "float32",
            "shape": [-1, *INPUT_SHAPE],
            "range": [0.0, 1.0],
            "layout": "NHWC RGB",
        },
        "training": {
            **train_config.to_dict(),
            "epochs_run": len(history.get("loss", [])),
            "interrupted": interrupted,
            "training_seconds": round(training_seconds, 1),
            **({"time_budget": budget.to_card()} if budget is not None else {}),
            "distribute": _distribution_card(plan),
            "hardware": {**hardware_description(), "cores_used": cores},
        },
        "data": {
            "source": data.source,
            "train_images": len(data.train),
            "validation_images": len(data.validation),
            "validation_seed": train_config.seed,
        },
        # The exported graph's own figures (float32, flip averaging when enabled), checked
        # through its serving_default before it is published, and Keras' best-epoch figure
        # (training precision, one pass per image) under its own name.
        "metrics": {
            **calibrated_metrics(calibration, {}),
            "validation_accuracy_keras_best_epoch": round(float(best_val), 4),
        },
    }
    if train_config.calibrate:
        metadata["calibration"] = calibration.to_card()
    else:
        metadata["metrics"]["validation_ece"] = round(calibration.ece_before, 4)
    export_dir = export_model(
        model,
        model_config,
        model_base_path,
        class_names=class_names,
        metadata=metadata,
        version=version,
        flip_tta=train_config.flip_tta,
        temperature=temperature,
        extra_files={HISTORY_FILE: history_file, CURVES_FILE: curves_file},
        check=calibrated_answers_check(data.validation.images, val_logits, temperature),
        weight_storage=DEFAULT_WEIGHT_STORAGE,
    )
    if multi_worker:
        _wait_for_every_worker(plan)
    return TrainResult(
        export_dir=export_dir,
        history=history,
        best_val_accuracy=float(best_val),
        epochs_run=len(history.get("loss", [])),
        training_seconds=training_seconds,
        interrupted=interrupted,
        metadata=metadata,
        stopped_by_time_budget=budget is not None and budget.stopped_early,
    )


def training_batches(
    dataset: Dataset, config: TrainConfig, *, shard: Shard | None = None, repeat: bool = True
) -> tf.data.Dataset:
    """The training pipeline ``config`` describes, with one-hot labels for the loss.

    Endless by default: ``fit`` (given ``steps_per_epoch``) and the multi-worker loop keep one
    iterator for the whole run (``make_tf_dataset``'s ``repeat``).
    """
    num_classes = len(dataset.class_names)
    return make_tf_dataset(
        dataset,
        batch_size=config.batch_size,
        training=True,
        seed=config.seed,
        shard=shard,
        jpeg=config.jpeg_augment(),
        crop_padding=config.crop_padding,
        jpeg_pairs=config.jpeg_consistency > 0,
        repeat=repeat,
    ).map(lambda x, y: (x, _one_hot(y, num_classes)))


def _one_hot(labels: Any, num_classes: int) -> Any:
    import tensorflow as tf

    return tf.one_hot(labels, num_classes)


def _history_recorder(target: dict[str, list[float]]) -> keras.callbacks.Callback:
    """Keeps per-epoch logs even when fit() is interrupted (Keras' History is lost then)."""
    import keras

    class Recorder(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            for key, value in (logs or {}).items():
                target.setdefault(key, []).append(float(value))

    return Recorder()


def _replicas_per_worker(plan: _Plan) -> int:
    workers = plan.role.num_workers if plan.role is not None else 1
    return max(1, int(plan.strategy.num_replicas_in_sync) // workers)


def _wait_for_every_worker(plan: _Plan) -> None:
    """A barrier: returns once every replica of every worker has called it.

    Workers wait here for the chief's export before they exit: TensorFlow's coordination
    service reports a task that has gone as unhealthy and aborts the others, the chief
    included, possibly in the middle of writing the export. (If the chief fails instead, its
    exit ends the barrier with an error on every worker, so nothing waits forever.)
    """
    import tensorflow as tf

    strategy = plan.strategy

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def barrier() -> Any:
        def replica_fn() -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(1.0))

        return strategy.run(replica_fn)

    barrier()


def _architecture_type(config: ModelConfig) -> str:
    if not config.tcn:
        return "ablation: conv stem, tokens average-pooled, no TCN"
    if config.stem_filters:
        return "TCN (dilated causal residual 1-D convolutions) over a conv-stem token sequence"
    return "TCN over the pixel sequence"


def _distribution_card(plan: _Plan) -> dict[str, Any]:
    """How the run was spread, for the run's config.json and the model card."""
    card: dict[str, Any] = {
        "mode": plan.mode,
        "strategy": type(plan.strategy).__name__,
        "replicas": int(plan.strategy.num_replicas_in_sync),
    }
    if plan.role is not None:
        card.update(workers=plan.role.num_workers, engine="strategy.run loop (Keras fit fails)")
    return card


def _step_totals(labels: Any, logits: Any, per_example_loss: Any) -> Any:
    """[summed loss, correct predictions, images] of one batch: sums add up across replicas."""
    import tensorflow as tf

    correct = tf.equal(tf.argmax(labels, axis=-1), tf.argmax(logits, axis=-1))
    return tf.stack(
        [
            tf.reduce_sum(per_example_loss),
            tf.reduce_sum(tf.cast(correct, tf.float32)),
            tf.cast(tf.shape(labels)[0], tf.float32),
        ]
    )


def _logs(totals: Any, prefix: str = "") -> dict[str, float]:
    """Keras' epoch logs (``loss``, ``accuracy``) from summed totals: per-image means."""
    images = max(float(totals[2]), 1.0)
    return {
        f"{prefix}loss": float(totals[0]) / images,
        f"{prefix}accuracy": float(totals[1]) / images,
    }


def _fit_multi_worker(
    model: keras.Model,
    plan: _Plan,
    data: DataSplits,
    config: TrainConfig,
    steps_per_epoch: int,
    callbacks: Sequence[keras.callbacks.Callback],
) -> None:
    """What ``model.fit`` does, for MultiWorkerMirroredStrategy, where Keras 3's fit fails.

    Each step runs on every replica through ``strategy.run``: the replica's share of the global
    batch, the compiled optimizer (which sums the replicas' gradients and applies the update on
    every replica, weight decay and learning-rate schedule included) and the training loss
    divided by the *global* batch, so the update equals the single-machine one on the same
    images. The Keras callbacks are the ones ``fit`` gets (best-checkpointing, early stopping,
    history, progress), called at the same points with the same logs.

    Every number that decides something is the same on every worker: the training totals are
    summed across replicas, BatchNorm's moving statistics (updated per replica from its own
    share) are averaged across replicas after each epoch, and validation runs on each worker's
    shard of the validation set with the totals summed across workers. So all workers checkpoint
    the same epochs and stop together, and their weights stay equal.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    assert plan.role is not None
    strategy = plan.strategy
    role = plan.role
    replicas_per_worker = _replicas_per_worker(plan)
    num_classes = len(data.train.class_names)
    loss_fn = training_loss(config, reduction="none")
    optimizer = model.optimizer
    global_batch = float(config.batch_size)
    sum_op = tf.distribute.ReduceOp.SUM

    def one_hot(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return images, _one_hot(labels, num_classes)

    def train_input(context: tf.distribute.InputContext) -> tf.data.Dataset:
        shard = Shard(
            context.input_pipeline_id,
            context.num_input_pipelines,
            context.num_replicas_in_sync // context.num_input_pipelines,
        )
        return training_batches(data.train, config, shard=shard)

    train_batches = strategy.distribute_datasets_from_function(train_input)
    val_batches = make_tf_dataset(
        data.validation,
        batch_size=config.batch_size,
        training=False,
        shard=Shard(role.worker_id, role.num_workers),
    ).map(one_hot)

    @tf.function  # type: ignore[untyped-decorator]  # TensorFlow ships no type hints
    def train_step(iterator: Any) -> tf.Tensor:
        def replica_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                logits = tf.cast(model(images, training=True), tf.float32)
                per_example = loss_fn(labels, logits)
                loss = tf.reduce_sum(per_example) / global_batch
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(gradients, model.trainable_variables)
            return _step_totals(labels, logits, per_example)

        totals = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(sum_op, totals, axis=None)

    @tf.function  # type: ignore[untyped-decorator]
    def eval_batch(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        # Called outside strategy.run: this worker's replica-0 copy of the (equal) weights.
        logits = tf.cast(model(images, training=False), tf.float32)
        return _step_totals(labels, logits, loss_fn(labels, logits))

    @tf.function  # type: ignore[untyped-decorator]
    def sum_over_workers(values: tf.Tensor) -> tf.Tensor:
        def replica_sum(local: tf.Tensor) -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            # Each worker's value enters once, through its first local replica.
            first = tf.equal(context.replica_id_in_sync_group % replicas_per_worker, 0)
            return context.all_reduce(sum_op, tf.where(first, local, tf.zeros_like(local)))

        return strategy.experimental_local_results(strategy.run(replica_sum, args=(values,)))[0]

    statistics = [
        v for v in model.non_trainable_variables if np.issubdtype(np.dtype(v.dtype), np.floating)
    ]

    @tf.function  # type: ignore[untyped-decorator]
    def average_statistics() -> None:
        def replica_average() -> None:
            context = tf.distribute.get_replica_context()
            current = [tf.identity(v.value) for v in statistics]  # tensors, not variables
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, current)
            for variable, value in zip(statistics, means, strict=True):
                variable.assign(value)

        strategy.run(replica_average)

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_progbar=bool(config.verbose) and role.is_chief,
        model=model,
        verbose=config.verbose,
        epochs=config.epochs,
        steps=steps_per_epoch,
    )
    model.stop_training = False
    logs: dict[str, float] = {}
    callback_list.on_train_begin()
    # One iterator over the endless pipeline for the whole run, as fit keeps one: the same
    # per-epoch orders, so one worker reproduces the fit path's run.
    iterator = iter(train_batches)
    for epoch in range(config.epochs):
        callback_list.on_epoch_begin(epoch)
        totals = np.zeros(3)
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            totals += train_step(iterator).numpy()
            callback_list.on_train_batch_end(step, _logs(totals))
        if statistics:
            average_statistics()
        local = np.zeros(3, np.float32)
        for images, labels in val_batches:
            local += eval_batch(images, labels).numpy()
        validation = sum_over_workers(tf.constant(local)).numpy()
        logs = {**_logs(totals), **_logs(validation, prefix="val_")}
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)


def train_from_dir(
    data_dir: str | os.PathLike[str] | None,
    *,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Load ``data_dir`` (CIFAR batches, image folder, or None to download) and train."""
    kwargs.setdefault("started", time.monotonic())  # a time budget counts the loading too
    train_config = train_config or TrainConfig()
    check_distribute(kwargs.get("distribute", "none"))  # before the data: fail in a second
    data = load_splits(
        data_dir, validation_size=train_config.validation_size, seed=train_config.seed
    )
    return train(data, model_config=model_config, train_config=train_config, **kwargs)
