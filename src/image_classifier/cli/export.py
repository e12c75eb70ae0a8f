"""``image-classifier export --from DIR``: re-export a version with the current signatures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from image_classifier.cli._common import SubParsers


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="re-export an existing version with this release's signatures (same weights)",
        description="Rebuild the model of an exported version from its model card, read its "
        "weights, check that it answers exactly as before, and export it as the next version "
        "of the base path with this release's signatures and warmup data. For upgrading a "
        "shipped model's serving contract without retraining.",
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from image_classifier.export import reexport

    written = reexport(args.source, args.model_base_path, version=args.version)
    print(json.dumps({"export_dir": str(written)}, indent=2))
    return 0
