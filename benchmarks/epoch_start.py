"""How long Keras' ``fit`` waits for the first batch of each epoch, per-epoch iterators against
one endless iterator, side by side.

``train`` feeds ``fit`` an endless pipeline (``training_batches``, ``make_tf_dataset(...,
repeat=True)``) with ``steps_per_epoch``, so one tf.data iterator serves the whole run. The
alternative, a finite pipeline, makes ``fit`` open a new iterator every epoch (and a spare
one at each epoch's end); each start rewrites the pipeline's graph over the in-memory training
set, restarts the autotuner and refills the shuffle buffer and the parallel JPEG map before the
first step can run. This script fits a deliberately trivial model on the recipe's real input
pipeline (``configs/cifar10_tcn.json``: batch, crops, JPEG augmentation), so the input side is
what is timed, and alternates the two arms run by run:

- ``per-epoch``: ``repeat=False``, no ``steps_per_epoch`` (what ``train`` did before);
- ``endless``: ``repeat=True`` and ``steps_per_epoch`` (what ``train`` does).

For each run it prints every epoch's wait before its first step and the epoch's time, then the
median and maximum wait per arm. Waits are irregular and grow when the cores are busy, as
they are in a real run, where the training step uses them all: ``--busy`` keeps every core
loaded with matrix products in a child process meanwhile. Look at the maxima over a few
rounds. Uses the CIFAR-10 batches when ``--data-dir`` has them, else 45,000 synthetic images.

Usage::

    .venv/bin/python benchmarks/epoch_start.py [--data-dir ../shared/datasets/cifar-10-batches-py]
        [--epochs 8] [--rounds 2] [--busy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from image_classifier.constants import CIFAR10_CLASSES
from image_classifier.data import Dataset, load_splits
from image_classifier.train import configure_threads, load_configs, training_batches

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "cifar10_tcn.json"
ARMS = ("per-epoch", "endless")


def training_images(data_dir: Path | None) -> Dataset:
    if data_dir is not None and (data_dir / "data_batch_1").is_file():
        return load_splits(data_dir, validation_size=5000).train
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (45_000, 32, 32, 3), dtype=np.uint8)
    return Dataset(images, rng.integers(0, 10, 45_000), CIFAR10_CLASSES)


def run(arm: str, data: Dataset, epochs: int) -> list[dict[str, float]]:
    import keras

    _, config = load_configs(RECIPE)
    endless = arm == "endless"
    batches = training_batches(data, config, repeat=endless)
    steps = -(-len(data) // config.batch_size)

    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Flatten()(keras.layers.Conv2D(8, 3, strides=4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(features))
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True))

    epochs_seen: list[dict[str, float]] = []

    class Timer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()
            self.first: float | None = None

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.first is None:
                self.first = time.perf_counter() - self.start

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epochs_seen.append(
                {
                    "first_step_s": round(self.first or 0.0, 3),
                    "epoch_s": round(time.perf_counter() - self.start, 3),
                }
            )

    model.fit(
        batches,
        epochs=epochs,
        steps_per_epoch=steps if endless else None,
        callbacks=[Timer()],
        verbose=0,
        shuffle=False,  # the pipeline shuffles
    )
    return epochs_seen


# Matrix products on every core until killed: the load a training step puts beside the input.
BUSY = "import numpy as np\na = np.random.rand(1200, 1200)\nwhile True:\n    a @ a\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="load every core meanwhile")
    args = parser.parse_args()
    cores = configure_threads()
    data = training_images(args.data_dir)
    load = None
    if args.busy:
        threads = {name: str(cores) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        load = subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, **threads})
    waits: dict[str, list[float]] = {arm: [] for arm in ARMS}
    try:
        for round_ in range(args.rounds):
            for arm in ARMS:
                epochs = run(arm, data, args.epochs)
                # The first epoch's wait includes tracing the step function: not the input's.
                waits[arm] += [e["first_step_s"] for e in epochs[1:]]
                print(json.dumps({"round": round_, "arm": arm, "epochs": epochs}), flush=True)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    busy = " (every core busy)" if args.busy else ""
    print(f"\nwait before each epoch's first step, epochs 2-{args.epochs} x {args.rounds}{busy}")
    print("| arm | median s | max s |\n|---|---|---|")
    for arm, values in waits.items():
        print(f"| {arm} | {statistics.median(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
