"""``image-classifier make-request``: a picture as a TF Serving predict body (test_data.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from image_classifier.cli._common import SubParsers


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "make-request",
        help="turn a picture into a TF Serving predict request body (test_data.json)",
        description="Preprocess IMAGE with the shared preprocess function (32x32 RGB, [0, 1]) "
        'and write {"instances": [...]} for: curl -X POST '
        "http://localhost:8501/v1/models/image_classifier:predict -d @test_data.json",
    )
    p.add_argument("image", type=Path, help="the picture (JPEG, PNG, WebP, BMP, GIF or TIFF)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("test_data.json"),
        help="where the request body goes (default test_data.json)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from image_classifier.client import write_request_json

    written = write_request_json(args.image, args.output)  # OSError: one line from main()
    print(f"wrote {written}")
    return 0
