"""``image-classifier evaluate``: an export's accuracy, calibration and JPEG robustness through
its serving signature."""

from __future__ import annotations

import argparse
import json

from image_classifier.cli._common import SubParsers, int_tuple
from image_classifier.constants import DEFAULT_MODEL_BASE_PATH


def register(subparsers: SubParsers) -> None:
    from image_classifier.evaluate import JPEG_QUALITIES  # NumPy and Pillow only, no TensorFlow

    p = subparsers.add_parser(
        "evaluate",
        help="measure an export's accuracy through its serving signature",
        description="Load the SavedModel (highest version unless --version) and call its "
        "serving_default signature as TensorFlow Serving does. Uses the data's test_batch when "
        "present, else the validation split recorded in the model card. Prints overall and "
        "per-class accuracy, the expected calibration error (15 bins; before and after "
        "calibration for a calibrated export) and the accuracy on the same images re-encoded "
        "as JPEG (decoded by the gateway's preprocessing) as JSON, and writes it with a "
        "confusion-matrix PNG and a reliability-diagram PNG. A progress bar runs on stderr.",
    )
    p.add_argument(
        "--model-dir",
        default=DEFAULT_MODEL_BASE_PATH,
        help="model base path or one version directory",
    )
    p.add_argument("--data-dir", help="cifar-10-batches-py directory or image folder")
    p.add_argument("--version", type=int, help="version to evaluate (default: the highest)")
    p.add_argument("--confusion-png", help="default: confusion_matrix.png in the version dir")
    p.add_argument(
        "--split",
        choices=["auto", "test", "validation"],
        default="auto",
        help="auto (default): test_batch when the data has one, else the validation split",
    )
    p.add_argument("--matrix", action="store_true", help="include the confusion matrix in JSON")
    p.add_argument(
        "--jpeg-qualities",
        type=int_tuple,
        default=JPEG_QUALITIES,
        help="JPEG qualities to measure accuracy at, comma-separated (default "
        f"{','.join(map(str, JPEG_QUALITIES))}; empty string: none)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar on stderr when it is a terminal (default on)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from image_classifier.evaluate import evaluate

    report = evaluate(
        args.model_dir,
        args.data_dir,
        version=args.version,
        confusion_png=args.confusion_png,
        split=args.split,
        jpeg_qualities=args.jpeg_qualities,
        progress=args.progress,
    )
    result = report.to_dict()
    if not args.matrix:
        result.pop("confusion_matrix")
    print(json.dumps(result, indent=2))
    return 0
