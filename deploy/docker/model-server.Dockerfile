# syntax=docker/dockerfile:1
#
# The embedded TF-Serving-compatible model server (`image-classifier model-server`) with the
# exported model baked in: what deploy/k8s/overlays/embedded runs instead of TensorFlow Serving.
# Same REST and gRPC APIs, paths and flag names as tensorflow_model_server. It installs the
# [serve] extra (TensorFlow, FastAPI, uvicorn) and runs as an unprivileged user.
#
# Build from the repository root (the build context must hold pyproject.toml, src/, the model
# and docker/tf_serving/):
#
#   docker build -f deploy/docker/model-server.Dockerfile -t image_classifier_model_server .
#   docker run -p 8500:8500 -p 8501:8501 image_classifier_model_server
#   curl http://localhost:8501/v1/models/image_classifier     # -> "state": "AVAILABLE"
#
# As with the TF Serving image, arguments given to `docker run` (or a Kubernetes `args:`) are
# appended to the server's command line, so the same flags work on both:
#
#   docker run -p 8501:8501 image_classifier_model_server \
#     --monitoring_config_file=/etc/tf_serving/monitoring.config \
#     --enable_batching=true --batching_parameters_file=/etc/tf_serving/batching.config
#
# Needs BuildKit (the default builder since Docker 23) for the RUN --mount below.

# --- build: one wheel for the project and one for each [serve] dependency -----------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src/ src/
# TF Serving's message types (warm-up records are TF Serving protos): the same pin as
# scripts/bootstrap.sh, fetched without its dependencies because its wheel declares the full
# `tensorflow` package, a second TensorFlow next to tensorflow-cpu (see that script).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[serve]" \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels-nodeps "tensorflow-serving-api==2.21.0"

# --- runtime: the wheels installed offline, no build tools, no sources ---------------------------
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Exactly the set the builder resolved, checked with `pip check` before the one wheel that is
# installed without its (deliberately unmet) `tensorflow` requirement.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/wheels-nodeps,target=/wheels-nodeps \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && pip check \
    && pip install --no-cache-dir --no-index --no-deps /wheels-nodeps/*.whl

# An unprivileged system user with a fixed numeric id (Kubernetes' runAsNonRoot can verify it).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-log-init --no-create-home \
       --shell /usr/sbin/nologin app

# The same configs and model layout as the TF Serving image (the repository-root Dockerfile).
COPY docker/tf_serving/ /etc/tf_serving/
COPY saved_models/image_classifier /models/image_classifier

WORKDIR /app
USER 10001:10001

# MODEL_NAME as in the TF Serving image (probes read it); HOME points at the writable /tmp, so
# nothing tries to write into a read-only root filesystem.
ENV MODEL_NAME=image_classifier \
    HOME=/tmp

# 8500: gRPC (PredictionService, ModelService); 8501: REST (/v1/models/image_classifier[:predict],
# /v2 (KServe), /monitoring/prometheus/metrics when enabled). The same ports as TF Serving's image.
EXPOSE 8500 8501

ENTRYPOINT ["image-classifier", "model-server", "--host", "0.0.0.0", "--port", "8500", "--rest_api_port", "8501", "--model_name", "image_classifier", "--model_base_path", "/models/image_classifier"]
