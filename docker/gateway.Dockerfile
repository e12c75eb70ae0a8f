# syntax=docker/dockerfile:1
#
# The FastAPI gateway in front of TensorFlow Serving. It installs image-classifier with the
# [gateway] extra only: FastAPI, httpx, Pillow, NumPy... and no TensorFlow, which lives in the
# tf_serving image (the repository-root Dockerfile).
#
# Build from the repository root (the build context must contain pyproject.toml and src/):
#
#   docker build -f docker/gateway.Dockerfile -t image_classifier_gateway .
#   docker network create ic
#   docker run -d --network ic --name=tf_serving image_classifier_server
#   docker run --network ic -p 8000:8000 image_classifier_gateway
#
# or simply `docker compose up --build`, which wires both together (compose.yaml).
# Needs BuildKit (the default builder since Docker 23) for the RUN --mount below.

# --- build: one wheel for the project and one for each [gateway] dependency ---------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /build
# pyproject.toml and README.md (its `readme`) are all setuptools needs besides the sources.
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gateway]"

# --- runtime: the wheels installed offline, no compiler, no build tools, no sources --------------
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Exactly the set the builder resolved, from /wheels only (--no-index): the wheels are bind-mounted
# for this one step, so they never become a layer of the final image. `pip check` fails the build
# if that set is inconsistent.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && pip check

# An unprivileged system user with a fixed numeric id (Kubernetes' runAsNonRoot can verify it).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-log-init --no-create-home \
       --shell /usr/sbin/nologin app

WORKDIR /app
USER 10001:10001

# Gateway settings (pydantic-settings reads them from the environment). The default points at a
# sibling container named tf_serving: the compose service, or `docker run --name=tf_serving`
# on a shared network. Override with -e TF_SERVING_URL=... elsewhere.
ENV TF_SERVING_URL=http://tf_serving:8501 \
    MODEL_NAME=image_classifier

EXPOSE 8000

# Liveness only (/health: the process answers). The slim image has no curl or wget, so the probe
# is Python's urllib: urlopen raises on connection errors and on any 4xx/5xx, giving exit 1.
# compose.yaml overrides this with a /ready probe (model AVAILABLE in TF Serving).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["image-classifier", "gateway", "--host", "0.0.0.0", "--port", "8000"]
