"""``python -m image_classifier.gateway``: the same as ``image-classifier gateway``."""

import sys

from image_classifier.gateway.run import gateway_main

sys.exit(gateway_main(sys.argv[1:]))
