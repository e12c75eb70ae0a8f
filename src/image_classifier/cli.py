"""``image-classifier``: thin command-line wrappers over the library functions.

Each subcommand parses arguments, calls one library function and prints its result; errors from
the package's hierarchy become a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from image_classifier import model_server
from image_classifier.constants import DEFAULT_MODEL_BASE_PATH, MODEL_NAME
from image_classifier.errors import ImageClassifierError
from image_classifier.gateway import commands as gateway_commands


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


# --- train / evaluate ---------------------------------------------------------------------------


def _add_train(subparsers: Any) -> None:
    from image_classifier.model import ModelConfig
    from image_classifier.train import TrainConfig

    m, t = ModelConfig(), TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train the TCN and export a new SavedModel version",
        description="Train on CIFAR-10 batches or an image folder, keep the epoch with the best "
        "validation accuracy, and export it as <model-base-path>/<next version>/ with its "
        "history, training curves and model card. Ctrl-C exports the best epoch so far.",
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
    p.add_argument("--model-base-path", default=DEFAULT_MODEL_BASE_PATH)
    p.add_argument("--version", type=int, help="version number to write (default: next free)")
    p.add_argument("--run-dir", help="where checkpoints and logs go (default runs/<timestamp>)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"default {t.epochs}")
    g.add_argument("--batch-size", type=int, help=f"default {t.batch_size}")
    g.add_argument(
        "--learning-rate", type=float, help=f"peak LR at batch 512, default {t.learning_rate}"
    )
    g.add_argument("--weight-decay", type=float, help=f"default {t.weight_decay}")
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
    a = p.add_argument_group("architecture")
    a.add_argument(
        "--stem-filters",
        type=_int_tuple,
        help=f"default {m.stem_filters}; empty string: no stem (pixel sequence)",
    )
    a.add_argument("--layout", choices=["raster", "rows"], help=f"default {m.layout}")
    a.add_argument("--tcn-filters", type=int, help=f"default {m.tcn_filters}")
    a.add_argument("--kernel-size", type=int, help=f"default {m.kernel_size}")
    a.add_argument("--dilations", type=_int_tuple, help=f"default {m.dilations}")
    a.add_argument("--dropout", type=float, help=f"default {m.dropout}")
    a.add_argument("--norm", choices=["batch", "layer"], help=f"default {m.norm}")
    p.set_defaults(func=_run_train)


_TRAIN_FLAGS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "label_smoothing",
    "warmup_fraction",
    "early_stopping_patience",
    "validation_size",
    "seed",
    "precision",
    "flip_tta",
)
_MODEL_FLAGS = (
    "stem_filters",
    "layout",
    "tcn_filters",
    "kernel_size",
    "dilations",
    "dropout",
    "norm",
)


def _run_train(args: argparse.Namespace) -> int:
    from image_classifier.model import ModelConfig
    from image_classifier.train import TrainConfig, train_from_dir

    file_config: dict[str, Any] = {}
    if args.config:
        file_config = json.loads(args.config.read_text(encoding="utf-8"))
    model_values = {
        **file_config.get("model", {}),
        **{k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None},
    }
    train_values = {
        **file_config.get("train", {}),
        **{k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None},
    }
    model_config = ModelConfig.from_dict({**ModelConfig().to_dict(), **model_values})
    train_config = dataclasses.replace(TrainConfig(), **train_values)
    result = train_from_dir(
        args.data_dir,
        model_config=model_config,
        train_config=train_config,
        model_base_path=args.model_base_path,
        version=args.version,
        run_dir=args.run_dir,
    )
    print(
        json.dumps(
            {
                "export_dir": str(result.export_dir),
                "best_val_accuracy": round(result.best_val_accuracy, 4),
                "epochs_run": result.epochs_run,
                "training_seconds": round(result.training_seconds, 1),
                "interrupted": result.interrupted,
            },
            indent=2,
        )
    )
    return 0


def _add_evaluate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="measure an export's accuracy through its serving signature",
        description="Load the SavedModel (highest version unless --version) and call its "
        "serving_default signature as TensorFlow Serving does. Uses the data's test_batch when "
        "present, else the validation split recorded in the model card. Prints overall and "
        "per-class accuracy as JSON and writes a confusion-matrix PNG.",
    )
    p.add_argument(
        "--model-dir",
        default=DEFAULT_MODEL_BASE_PATH,
        help="model base path or one version directory",
    )
    p.add_argument("--data-dir", help="cifar-10-batches-py directory or image folder")
    p.add_argument("--version", type=int)
    p.add_argument("--confusion-png", help="default: confusion_matrix.png in the version dir")
    p.add_argument(
        "--split",
        choices=["auto", "test", "validation"],
        default="auto",
        help="auto (default): test_batch when the data has one, else the validation split",
    )
    p.add_argument("--matrix", action="store_true", help="include the confusion matrix in JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from image_classifier.evaluate import evaluate

    report = evaluate(
        args.model_dir,
        args.data_dir,
        version=args.version,
        confusion_png=args.confusion_png,
        split=args.split,
    )
    result = report.to_dict()
    if not args.matrix:
        result.pop("confusion_matrix")
    print(json.dumps(result, indent=2))
    return 0


# --- serving -----------------------------------------------------------------------------------


def _add_make_request(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "make-request",
        help="turn a picture into a TF Serving predict request body (test_data.json)",
        description="Preprocess IMAGE with the shared preprocess function (32x32 RGB, [0, 1]) "
        'and write {"instances": [...]} for: curl -X POST '
        "http://localhost:8501/v1/models/image_classifier:predict -d @test_data.json",
    )
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("test_data.json"))
    p.set_defaults(func=_run_make_request)


def _run_make_request(args: argparse.Namespace) -> int:
    from image_classifier.client import write_request_json

    try:
        written = write_request_json(args.image, args.output)
    except OSError as exc:
        print(f"error: cannot read or write a file: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


# --- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-classifier",
        description=f"Train, export, serve and call the {MODEL_NAME} CIFAR-10 TCN classifier.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_evaluate(subparsers)
    model_server.add_cli(subparsers)
    _add_make_request(subparsers)
    gateway_commands.add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ImageClassifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
