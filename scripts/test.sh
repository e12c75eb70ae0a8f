#!/usr/bin/env bash
# The test command: installs everything it needs on a fresh machine, then lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh dev

# The web-page test drives Debian's headless Chromium (Playwright's own browser download is not
# used: only package registries are reachable).
if [ ! -x /usr/bin/chromium ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && \
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
    >/dev/null || echo "warning: could not install chromium; the browser test will fail" >&2
fi

.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
# Strict type checking of the package (settings in pyproject.toml, [tool.mypy]).
.venv/bin/mypy
# Every test must run here: a skip (missing browser, TensorFlow, dataset) counts as a failure.
# One pytest worker per core (pytest-xdist; PYTEST_XDIST_AUTO_NUM_WORKERS overrides the count),
# tests handed out one at a time as workers free up. Servers in tests take free ports and tests
# write under pytest's temporary directories (the browser tests' screenshots, a file per state,
# aside), so workers do not collide.
IMAGE_CLASSIFIER_STRICT_SKIPS=1 .venv/bin/python -m pytest -n auto --dist worksteal "$@"
