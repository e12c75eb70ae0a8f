"""``python -m image_classifier.model_server --rest_api_port 8501 ...``."""

import sys

from image_classifier.model_server import main

sys.exit(main())
