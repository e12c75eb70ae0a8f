"""One router per resource; :mod:`image_classifier.gateway.app` includes them all."""
