"""``image-classifier train``: train the TCN and export the next SavedModel version."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from image_classifier.cli._common import SubParsers, int_tuple
from image_classifier.constants import DEFAULT_MODEL_BASE_PATH


def register(subparsers: SubParsers) -> None:
    from image_classifier.model import ACTIVATIONS, POOLINGS, READOUTS, ModelConfig
    from image_classifier.train import DISTRIBUTE_MODES, LOOKAHEAD_EVERY, TrainConfig

    m, t = ModelConfig(), TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train the TCN and export a new SavedModel version",
        description="Train on CIFAR-10 batches or an image folder, keep the epoch with the best "
        "validation accuracy, fit a temperature on the validation split, and export it "
        "calibrated as <model-base-path>/<next version>/ with its history, training curves and "
        "model card. Ctrl-C exports the best epoch so far.",
    )
    p.add_argument(
        "--data-dir",
        help="cifar-10-batches-py directory or an image-folder tree "
        "(root/<class>/*.jpg); omitted: download CIFAR-10 via keras.datasets",
    )
    p.add_argument(
        "--config",
        type=Path,
        help='JSON file {"model": {...}, "train": {...}}; command-line flags override it',
    )
    p.add_argument(
        "--model-base-path",
        default=DEFAULT_MODEL_BASE_PATH,
        help=f"where the new version is written (default {DEFAULT_MODEL_BASE_PATH})",
    )
    p.add_argument("--version", type=int, help="version number to write (default: next free)")
    p.add_argument("--run-dir", help="where checkpoints and logs go (default runs/<timestamp>)")
    p.add_argument(
        "--distribute",
        choices=DISTRIBUTE_MODES,
        default="none",
        help="none (default): this process's default device; mirrored: every local GPU "
        "(tf.distribute.MirroredStrategy); multi-worker: one process per machine, the cluster "
        "and this task read from the TF_CONFIG environment variable "
        "(MultiWorkerMirroredStrategy; only the chief exports). The global --batch-size and "
        "the learning-rate schedule stay as configured; --batch-size must divide evenly "
        "across the replicas",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"default {t.epochs}")
    g.add_argument(
        "--time-budget-minutes",
        type=float,
        metavar="MINUTES",
        help="wall-clock limit for the whole command: after every epoch the run plans how many "
        "of --epochs fit and ends its learning-rate schedule there (default: none; 0 lifts a "
        "limit the --config file sets)",
    )
    g.add_argument("--batch-size", type=int, help=f"default {t.batch_size}")
    g.add_argument(
        "--learning-rate", type=float, help=f"peak LR at batch 512, default {t.learning_rate}"
    )
    g.add_argument("--momentum", type=float, help=f"SGD-Nesterov momentum, default {t.momentum}")
    g.add_argument("--weight-decay", type=float, help=f"default {t.weight_decay}")
    g.add_argument(
        "--norm-bias-lr-scale",
        type=float,
        help="learning-rate multiplier for normalization biases (airbench: 64; "
        f"default {t.norm_bias_lr_scale})",
    )
    g.add_argument("--label-smoothing", type=float, help=f"default {t.label_smoothing}")
    g.add_argument("--warmup-fraction", type=float, help=f"default {t.warmup_fraction}")
    g.add_argument("--early-stopping-patience", type=int, help="epochs without improvement")
    g.add_argument("--validation-size", type=int, help=f"default {t.validation_size}")
    g.add_argument("--seed", type=int, help=f"default {t.seed}")
    g.add_argument(
        "--precision", choices=["float32", "mixed_bfloat16"], help=f"default {t.precision}"
    )
    g.add_argument(
        "--flip-tta",
        action=argparse.BooleanOptionalAction,
        help="export averages each image with its mirror (default on)",
    )
    g.add_argument(
        "--jpeg-augment-probability",
        type=float,
        help="share of training images re-encoded as JPEG at a random quality "
        f"(default {t.jpeg_augment_probability}; 0: off)",
    )
    g.add_argument(
        "--jpeg-quality-min", type=int, help=f"lowest JPEG quality, default {t.jpeg_quality_min}"
    )
    g.add_argument(
        "--jpeg-quality-max", type=int, help=f"highest JPEG quality, default {t.jpeg_quality_max}"
    )
    g.add_argument(
        "--jpeg-consistency",
        type=float,
        help="weight of a loss pulling each image's JPEG prediction towards its clean one; "
        "> 0 trains on clean/JPEG pairs of batch-size/2 images "
        f"(default {t.jpeg_consistency}; 0: off)",
    )
    g.add_argument(
        "--crop-padding",
        type=int,
        help=f"random crops shift images by up to this many pixels, default {t.crop_padding}",
    )
    g.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        help="fit a temperature on the validation split and export calibrated probabilities "
        "(default on)",
    )
    g.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        help=f"airbench's Lookahead: every {LOOKAHEAD_EVERY} steps the weights are pulled into "
        "a slow copy, more strongly as training ends, and finish as it (default off)",
    )
    a = p.add_argument_group("architecture")
    a.add_argument(
        "--stem-filters",
        type=int_tuple,
        help=f"default {m.stem_filters}; empty string: no stem (pixel sequence)",
    )
    a.add_argument(
        "--whiten-patch",
        type=int,
        help="open the stem with a frozen PxP patch-whitening convolution set from the data "
        f"(default {m.whiten_patch}: a trained 3x3 convolution)",
    )
    a.add_argument(
        "--chroma-subsample",
        action=argparse.BooleanOptionalAction,
        help="first layer: chroma at a default JPEG's half resolution, luma untouched "
        f"(default {'on' if m.chroma_subsample else 'off'})",
    )
    a.add_argument(
        "--whiten-epsilon",
        type=float,
        help="added to the patch covariance's eigenvalues: directions of lower variance are "
        f"damped, not scaled to unit variance (default {m.whiten_epsilon})",
    )
    a.add_argument(
        "--token-pool",
        type=int,
        help=f"max-pool the stem's grid by this before the TCN, default {m.token_pool}",
    )
    a.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="how the stem halves its grids: 2x2 max-pooling, or blur, the max made "
        "anti-aliased (a max at stride 1, then a 3-tap binomial blur at stride 2), or blur5, "
        f"the same with a 5-tap blur (default {m.pooling})",
    )
    a.add_argument("--layout", choices=["raster", "rows"], help=f"default {m.layout}")
    a.add_argument("--tcn-filters", type=int, help=f"default {m.tcn_filters}")
    a.add_argument("--kernel-size", type=int, help=f"default {m.kernel_size}")
    a.add_argument("--dilations", type=int_tuple, help=f"default {m.dilations}")
    a.add_argument(
        "--convs-per-block",
        type=int,
        help=f"causal convolutions in each TCN residual block, default {m.convs_per_block}",
    )
    a.add_argument("--dropout", type=float, help=f"default {m.dropout}")
    a.add_argument("--norm", choices=["batch", "layer"], help=f"default {m.norm}")
    a.add_argument(
        "--norm-scale",
        action=argparse.BooleanOptionalAction,
        help="--no-norm-scale: normalization layers learn only a bias, their scale fixed at 1 "
        "(airbench's BatchNorm; default: a learned scale)",
    )
    a.add_argument(
        "--dirac-init",
        action=argparse.BooleanOptionalAction,
        help="start the stem's 3x3 convolutions with their first filters as the identity "
        f"(airbench's partial Dirac initialization; default {'on' if m.dirac_init else 'off'})",
    )
    a.add_argument(
        "--norm-momentum",
        type=float,
        help="weight of the old running average in BatchNorm's statistics (Keras' convention; "
        f"airbench's PyTorch 0.6 is 0.4 here; default {m.norm_momentum})",
    )
    a.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        help=f"the nonlinearity after every normalization (airbench: gelu; default {m.activation})",
    )
    a.add_argument(
        "--logit-scale",
        type=float,
        help="multiply the logits by this before the loss "
        f"(airbench: 1/9; default {m.logit_scale})",
    )
    a.add_argument(
        "--readout",
        choices=READOUTS,
        help=f"what the classifier reads from the TCN's output steps (default {m.readout})",
    )
    a.add_argument(
        "--tcn",
        action=argparse.BooleanOptionalAction,
        help="--no-tcn trains the ablation: the stem's tokens average-pooled (max-pooled with "
        "--readout max) into the classifier, no TCN (default: the TCN)",
    )
    p.set_defaults(func=run)


_TRAIN_FLAGS = (
    "epochs",
    "time_budget_minutes",
    "batch_size",
    "learning_rate",
    "momentum",
    "weight_decay",
    "norm_bias_lr_scale",
    "label_smoothing",
    "warmup_fraction",
    "early_stopping_patience",
    "validation_size",
    "seed",
    "precision",
    "flip_tta",
    "jpeg_augment_probability",
    "jpeg_quality_min",
    "jpeg_quality_max",
    "jpeg_consistency",
    "crop_padding",
    "calibrate",
    "lookahead",
)
_MODEL_FLAGS = (
    "stem_filters",
    "whiten_patch",
    "whiten_epsilon",
    "chroma_subsample",
    "token_pool",
    "pooling",
    "layout",
    "tcn_filters",
    "kernel_size",
    "convs_per_block",
    "dilations",
    "dropout",
    "norm",
    "norm_scale",
    "norm_momentum",
    "dirac_init",
    "activation",
    "logit_scale",
    "tcn",
    "readout",
)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _given(args, _TRAIN_FLAGS)
    if overrides.get("time_budget_minutes") == 0:
        overrides["time_budget_minutes"] = None  # lifts a limit the config file sets
    return overrides


def run(args: argparse.Namespace) -> int:
    from image_classifier.train import load_configs, train_from_dir

    model_config, train_config = load_configs(
        args.config,
        model_overrides=_given(args, _MODEL_FLAGS),
        train_overrides=_train_overrides(args),
    )
    result = train_from_dir(
        args.data_dir,
        model_config=model_config,
        train_config=train_config,
        model_base_path=args.model_base_path,
        version=args.version,
        run_dir=args.run_dir,
        distribute=args.distribute,
    )
    print(
        json.dumps(
            {
                # null on a multi-worker run's non-chief workers: only the chief exports.
                "export_dir": None if result.export_dir is None else str(result.export_dir),
                "best_val_accuracy": round(result.best_val_accuracy, 4),
                "epochs_run": result.epochs_run,
                "training_seconds": round(result.training_seconds, 1),
                "interrupted": result.interrupted,
                "stopped_by_time_budget": result.stopped_by_time_budget,
            },
            indent=2,
        )
    )
    return 0
