#!/usr/bin/env python3
"""Rewrite README's model figures from the shipped model's card (``--check``: exit 1 if stale).

.venv/bin/python scripts/sync_readme.py [--check] [--version-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from image_classifier.model_card import figures_markdown, replace_block
from image_classifier.servable import resolve_version_dir

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is stale")
    parser.add_argument(
        "--version-dir",
        type=Path,
        help="the export whose card README shows (default: the highest shipped version)",
    )
    args = parser.parse_args()
    version_dir = args.version_dir or resolve_version_dir(ROOT / "saved_models/image_classifier")
    readme = ROOT / "README.md"
    current = readme.read_text(encoding="utf-8")
    updated = replace_block(current, figures_markdown(version_dir))
    if args.check:
        if updated != current:
            print("README's model figures differ from the card: run scripts/sync_readme.py")
            return 1
        return 0
    readme.write_text(updated, encoding="utf-8")
    print(f"README's model figures now show {version_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
