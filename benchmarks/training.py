"""Training speed of the shipped recipe's model: seconds per step and images/s, side by side.

Runs Keras' own ``train_on_batch`` on the recipe's architecture, optimizer, loss and precision
(``configs/cifar10_tcn.json``), on random images, so it measures the model and not the input
pipeline. Two arms alternate in one process, several rounds each, and the table reports the
median of each arm:

- ``fused``: the model as ``build_model`` makes it (``layers.FusedBatchNormalization``);
- ``keras``: the same model with Keras' own ``BatchNormalization``, the layer it replaced;
- ``v5-architecture``: version 5's architecture (``ModelConfig``'s defaults) under the same
  recipe, the model the whitened stem and nine-token TCN replaced;
- ``keras-conv1d``: the TCN with Keras' own ``Conv1D``, the layer ``layers.CausalConv1D``
  replaced (same arithmetic and variables);
- ``max-pool``: the recipe with plain 2x2 max-pooling (``"pooling": "max"``, version 8's
  architecture) in place of the anti-aliased pooling (``layers.BlurPool2D``) it ships with;
- ``blur5``: the recipe with the 5-tap blur pooling (``"pooling": "blur5"``);
- ``three-stage``: the recipe with a third stem stage in place of the token pooling
  (``--stem-filters 64,160,256 --token-pool 1 --tcn-filters 320``; docs/model-research.md,
  "A third stem stage");
- ``gelu``: the recipe with GELU in place of every ReLU (``--activation gelu``);
- ``airbench``: airbench94's network under its optimizer settings (``AIRBENCH_MODEL``;
  docs/model-research.md, "Airbench's recipe in this pipeline"), no TCN.

Usage::

    .venv/bin/python benchmarks/training.py [--arms fused,keras] [--batch-size 512]
        [--steps 8] [--rounds 3]

Run it with nothing else using the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from image_classifier import layers as layers_module
from image_classifier import model as model_module
from image_classifier.model import ModelConfig
from image_classifier.train import compile_model, configure_threads, load_configs

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "cifar10_tcn.json"
ARMS = (
    "fused",
    "keras",
    "v5-architecture",
    "keras-conv1d",
    "max-pool",
    "blur5",
    "three-stage",
    "gelu",
    "airbench",
)
# Airbench94's network: whitened stem, three convolution blocks of 64, 256 and 256 channels,
# GELU, BatchNorm without scales and with fast statistics, a global max-pool, logits / 9.
AIRBENCH_MODEL = {
    "stem_filters": (64, 256, 256),
    "token_pool": 1,
    "pooling": "max",
    "tcn": False,
    "readout": "max",
    "activation": "gelu",
    "norm_momentum": 0.4,
    "norm_scale": False,
    "logit_scale": 1 / 9,
}


def keras_batch_norm(config: ModelConfig, name: str) -> Any:
    import keras

    return keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, scale=config.norm_scale, name=name
    )


def build(arm: str, batch_size: int) -> Any:
    import keras

    model_config, train_config = load_configs(RECIPE, train_overrides={"batch_size": batch_size})
    if arm == "v5-architecture":
        model_config = ModelConfig()
    if arm == "max-pool":
        model_config = dataclasses.replace(model_config, pooling="max")
    if arm == "blur5":
        model_config = dataclasses.replace(model_config, pooling="blur5")
    if arm == "three-stage":
        model_config = dataclasses.replace(
            model_config, stem_filters=(64, 160, 256), token_pool=1, tcn_filters=320
        )
    if arm == "gelu":
        model_config = dataclasses.replace(model_config, activation="gelu")
    if arm == "airbench":
        model_config = dataclasses.replace(model_config, **AIRBENCH_MODEL)  # type: ignore[arg-type]
        train_config = dataclasses.replace(train_config, norm_bias_lr_scale=64.0)
    keras.mixed_precision.set_global_policy(train_config.precision)
    fused = model_module._batch_norm
    causal = layers_module.CausalConv1D
    if arm == "keras":
        model_module._batch_norm = keras_batch_norm
    if arm == "keras-conv1d":
        layers_module.CausalConv1D = keras.layers.Conv1D
    try:
        model = model_module.build_model(model_config)
    finally:
        model_module._batch_norm = fused
        layers_module.CausalConv1D = causal
    compile_model(model, train_config, steps_per_epoch=100)
    return model


def seconds_per_step(model: Any, images: np.ndarray, labels: np.ndarray, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(images, labels)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arms", default="fused,keras", help=f"comma-separated, of {', '.join(ARMS)}"
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cores = configure_threads()
    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size, 32, 32, 3), dtype=np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, args.batch_size)]
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    models = {arm: build(arm, args.batch_size) for arm in arms}
    for model in models.values():  # tracing and oneDNN primitive caches
        seconds_per_step(model, images, labels, 2)
    per_round: dict[str, list[float]] = {arm: [] for arm in models}
    for _ in range(args.rounds):
        for arm, model in models.items():
            per_round[arm].append(seconds_per_step(model, images, labels, args.steps))
    medians = {arm: statistics.median(values) for arm, values in per_round.items()}
    report = {
        "batch_size": args.batch_size,
        "cores": cores,
        "arms": {
            arm: {
                "seconds_per_step": round(seconds, 3),
                "images_per_second": round(args.batch_size / seconds, 1),
                "rounds": [round(s, 3) for s in per_round[arm]],
            }
            for arm, seconds in medians.items()
        },
        # How many times longer each arm's step takes than the first arm's.
        "step_time_ratio_to_first": {
            arm: round(seconds / medians[arms[0]], 2) for arm, seconds in medians.items()
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
