"""``image-classifier export --from DIR``: re-export a version with the current signatures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from image_classifier.cli._common import SubParsers
from image_classifier.constants import WEIGHT_STORAGES


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="re-export an existing version with this release's signatures (same weights)",
        description="Rebuild the model of an exported version from its model card, read its "
        "weights, check that it answers exactly as before, and export it as the next version "
        "of the base path with this release's signatures and warmup data. For upgrading a "
        "shipped model's serving contract without retraining. With --calibrate, a temperature "
        "is fitted on the validation split recorded in the card and the new version serves "
        "calibrated probabilities (same top class as the averaged logits). The weights keep "
        "the source's storage unless --weight-storage says otherwise.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        help="the version directory to re-export, e.g. saved_models/image_classifier/1",
    )
    parser.add_argument(
        "--model-base-path",
        type=Path,
        help="where the new version goes (default: the source's base path)",
    )
    parser.add_argument("--version", type=int, help="version number to write (default: next)")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit a temperature on the validation split and export calibrated probabilities "
        "(needs --data-dir)",
    )
    parser.add_argument(
        "--data-dir",
        help="cifar-10-batches-py directory or image folder the source was trained on "
        "(for --calibrate)",
    )
    parser.add_argument(
        "--validation-size", type=int, help="default: the size recorded in the model card"
    )
    parser.add_argument("--seed", type=int, help="split seed; default: the card's")
    parser.add_argument(
        "--weight-storage",
        choices=WEIGHT_STORAGES,
        help="how the new version stores its weights (it computes in float32 either way): "
        "float16 halves the variables; converting checks the new version against the rounded "
        "weights and records the largest probability difference from the source in the card "
        "(default: the source's storage; versions without one in their card are float32)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from image_classifier.errors import ConfigError
    from image_classifier.evaluate import validation_splits
    from image_classifier.export import reexport
    from image_classifier.servable import read_metadata, resolve_version_dir

    calibration_data = None
    if args.calibrate:
        if args.data_dir is None:
            raise ConfigError("--calibrate needs --data-dir (the validation split to fit on)")
        card = read_metadata(resolve_version_dir(args.source))
        calibration_data = validation_splits(
            card, args.data_dir, validation_size=args.validation_size, seed=args.seed
        ).validation
    written = reexport(
        args.source,
        args.model_base_path,
        version=args.version,
        calibration_data=calibration_data,
        weight_storage=args.weight_storage,
    )
    print(json.dumps({"export_dir": str(written)}, indent=2))
    return 0
