"""``image-classifier make-request``: pictures as a TF Serving predict body (test_data.json)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from image_classifier.cli._common import SubParsers
from image_classifier.client import REQUEST_FORMATS


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "make-request",
        help="turn pictures into a TF Serving predict request body (test_data.json)",
        description="Preprocess each IMAGE with the shared preprocess function (32x32 RGB, "
        '[0, 1]) and write {"instances": [...]}, one row per image, in order, for: curl -X POST '
        "http://localhost:8501/v1/models/image_classifier:predict -d @test_data.json",
    )
    p.add_argument(
        "images",
        metavar="IMAGE",
        nargs="+",
        type=Path,
        help="pictures (JPEG, PNG, WebP, BMP, GIF or TIFF); one instance each",
    )
    p.add_argument(
        "-o",
        "--output",
        default="test_data.json",
        help="where the request body goes; - for standard output (default test_data.json)",
    )
    p.add_argument(
        "--format",
        dest="request_format",
        choices=REQUEST_FORMATS,
        default="floats",
        help="floats: preprocessed floats for serving_default (default); bytes: each file as "
        '{"b64": ...} for serving_bytes (also what the gateway\'s /predict takes); pixels: the '
        'preprocessed image as raw uint8 {"b64": ...} for serving_pixels (~4 KB per image)',
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from image_classifier.client import request_text, write_request_json

    # OSError and invalid images become one line (exit 2) in main(), before anything is written.
    if args.output == "-":
        sys.stdout.write(request_text(args.images, args.request_format))
        return 0
    written = write_request_json(args.images, args.output, args.request_format)
    count = len(args.images)
    print(f"wrote {written} ({count} image{'s' if count != 1 else ''}, {args.request_format})")
    return 0
