"""Exported versions on disk: which exist, which one a path means, and loading one.

The only place that lists or resolves versions (export numbers the next one with
:func:`next_version`; the model server, the gateway, ``serve`` and evaluation resolve with
:func:`resolve_version_dir`) and the only place that loads one. Evaluation, the embedded model
server and the gateway's ``local`` backend all call the SavedModel's signatures, never the
in-memory Keras object, so what is measured and served is the artefact that ships. The
``signature_def`` table TF Serving reports is read once, at load, from ``saved_model.pb``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from image_classifier.constants import (
    BYTES_INPUT_KEY,
    CLASS_NAMES_ASSET,
    INPUT_KEY,
    METADATA_FILE,
    OUTPUT_KEY,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from image_classifier.errors import ModelNotFoundError
from image_classifier.tfserving.signatures import SignatureTable, read_signature_table


def list_versions(base_path: str | os.PathLike[str]) -> list[int]:
    """Integer version directories under ``base_path``, ascending (others are ignored, as TF
    Serving ignores them: that is what makes a hidden staging directory invisible)."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(base_path: str | os.PathLike[str]) -> int:
    versions = list_versions(base_path)
    return versions[-1] + 1 if versions else 1


@dataclass
class Servable:
    """One loaded model version."""

    path: Path
    version: int
    loaded: Any  # the object tf.saved_model.load returned
    class_names: tuple[str, ...]
    signature_table: SignatureTable
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def signatures(self) -> Any:
        return self.loaded.signatures

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 ``(n, 32, 32, 3)`` in [0, 1] -> probabilities ``(n, num_classes)``."""
        import tensorflow as tf

        batch = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
        result: np.ndarray = self.signatures[SERVING_DEFAULT](**{INPUT_KEY: batch})[OUTPUT_KEY]
        return np.asarray(result)

    def predict_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Encoded images through the in-graph decoder signature."""
        import tensorflow as tf

        batch = tf.constant(list(encoded), dtype=tf.string)
        result = self.signatures[SERVING_BYTES](**{BYTES_INPUT_KEY: batch})[OUTPUT_KEY]
        return np.asarray(result)


def resolve_version_dir(path: str | os.PathLike[str], version: int | None = None) -> Path:
    """Accept a model base path (highest or given version) or a version directory itself."""
    root = Path(path)
    if (root / "saved_model.pb").exists():
        if version is not None and root.name != str(version):
            raise ModelNotFoundError(f"{root} is version {root.name}, not {version}")
        return root
    versions = list_versions(root)
    if not versions:
        raise ModelNotFoundError(
            f"no model version under {root} (expected {root}/<integer>/saved_model.pb)"
        )
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise ModelNotFoundError(f"version {chosen} not found under {root} (have {versions})")
    return root / str(chosen)


def read_class_names(version_dir: Path) -> tuple[str, ...]:
    names_file = version_dir / "assets" / CLASS_NAMES_ASSET
    if not names_file.exists():
        raise ModelNotFoundError(f"{names_file} is missing: not an export of this project")
    return tuple(line for line in names_file.read_text(encoding="utf-8").splitlines() if line)


def read_metadata(version_dir: Path) -> dict[str, Any]:
    card = version_dir / METADATA_FILE
    if not card.exists():
        return {}
    content = json.loads(card.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ModelNotFoundError(f"{card} is not a JSON object: not an export of this project")
    return content


def tuned_thread_counts(cores: int | None = None) -> tuple[int, int]:
    """(intra-op, inter-op) TensorFlow threads for serving this project's exports on ``cores``.

    An export with flip averaging runs the model twice per image, the picture and its mirror,
    as two independent passes. Running both at once, each on half the cores, beats each pass
    spreading every op over all of them: on 2 cores a one-image call took 2.9-3.5 ms instead of
    4.5-4.7 with a fifth to a third less CPU (``benchmarks/inference.py --threads``).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // 2), 2


def load_servable(path: str | os.PathLike[str], version: int | None = None) -> Servable:
    """Load ``path`` (a base path or a version directory) with ``tf.saved_model.load``."""
    import tensorflow as tf

    from image_classifier.tfnotices import float16_notice_said_quietly

    version_dir = resolve_version_dir(path, version)
    table = read_signature_table(version_dir)
    float16_notice_said_quietly()  # exports store float16 weights: TensorFlow's notice, not here
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{version_dir} is not a loadable SavedModel: {exc}") from None
    return Servable(
        path=version_dir,
        version=int(version_dir.name) if version_dir.name.isdigit() else 0,
        loaded=loaded,
        class_names=read_class_names(version_dir),
        signature_table=table,
        metadata=read_metadata(version_dir),
    )
