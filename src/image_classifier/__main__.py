"""``python -m image_classifier COMMAND ...``: the same as ``image-classifier COMMAND ...``."""

import sys

from image_classifier.cli import main

sys.exit(main())
