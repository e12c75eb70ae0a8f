#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the given extras, e.g. "dev".
# Re-running is cheap: pip only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
# TF Serving's message types (tensorflow_serving.*_pb2), matching the pinned tensorflow-cpu. Its
# wheel declares a dependency on the full `tensorflow` wheel, which would install a second, huge
# TensorFlow next to tensorflow-cpu; so it goes in with --no-deps. Its other requirements (grpcio,
# protobuf) already come with tensorflow-cpu.
tf_serving_api="tensorflow-serving-api==2.21.0"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
case ",${extras}," in
  *,dev,* | *,serve,* | *,train,*)
    .venv/bin/python -m pip install --quiet --no-deps "${tf_serving_api}"
    ;;
esac
