"""``image-classifier evaluate``: an export's accuracy through its serving signature."""

from __future__ import annotations

import argparse
import json

from image_classifier.cli._common import SubParsers
from image_classifier.constants import DEFAULT_MODEL_BASE_PATH


def register(subparsers: SubParsers) -> None:
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
    p.add_argument("--version", type=int, help="version to evaluate (default: the highest)")
    p.add_argument("--confusion-png", help="default: confusion_matrix.png in the version dir")
    p.add_argument(
        "--split",
        choices=["auto", "test", "validation"],
        default="auto",
        help="auto (default): test_batch when the data has one, else the validation split",
    )
    p.add_argument("--matrix", action="store_true", help="include the confusion matrix in JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
