#!/usr/bin/env bash
# The main job: install the serving extras and start the embedded model server + gateway with
# the shipped model (no Docker needed). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh serve,gateway
exec .venv/bin/image-classifier serve "$@"
