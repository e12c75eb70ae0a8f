# syntax=docker/dockerfile:1
#
# `image-classifier train` in a container: the image deploy/k8s/training/ runs, one pod per
# worker (`--distribute multi-worker`, TF_CONFIG set by the Job). It installs the [train] extra
# (TensorFlow, matplotlib) and runs as an unprivileged user; data and the model store are
# volumes, not part of the image.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t image_classifier_trainer .
#   docker run -v "$PWD/../shared/datasets:/data:ro" -v "$PWD/saved_models:/models" \
#     image_classifier_trainer --config /app/configs/cifar10_tcn.json \
#     --data-dir /data/cifar-10-batches-py --model-base-path /models/image_classifier \
#     --run-dir /tmp/run
#
# Arguments are those of `image-classifier train` (see its --help). Needs BuildKit.

# --- build: one wheel for the project and one for each [train] dependency -----------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY src/ src/
# The export writes TF Serving warm-up records (TF Serving protos): the same pin as
# scripts/bootstrap.sh, without its dependencies (its wheel declares the full `tensorflow`).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[train]" \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels-nodeps "tensorflow-serving-api==2.21.0"

# --- runtime -------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/wheels-nodeps,target=/wheels-nodeps \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && pip check \
    && pip install --no-cache-dir --no-index --no-deps /wheels-nodeps/*.whl

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-log-init --no-create-home \
       --shell /usr/sbin/nologin app

WORKDIR /app
# The shipped model's recipe, which the Kubernetes Job names with --config.
COPY configs/ /app/configs/
USER 10001:10001

# Caches (matplotlib's font cache, Keras' config) go to /tmp: the root filesystem is read-only
# in the Kubernetes Job.
ENV HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib

# The workers' gRPC port (TF_CONFIG's addresses).
EXPOSE 2222

ENTRYPOINT ["image-classifier", "train"]
