"""Inference cost of an export: parameters, FLOPs per image, images/s at batch 1 and 256.

Calls the SavedModel's ``serving_default`` signature (what TF Serving runs), on this machine's
CPU. Usage::

    .venv/bin/python benchmarks/inference.py [--model-dir saved_models/image_classifier]
        [--version N] [--batch-sizes 1,256] [--threads default|tuned]

``--version`` picks a version (default: the highest, the one servers pick); comparing two
versions, run them alternately a few times each.

``--threads tuned`` runs with the TensorFlow threading ``image-classifier serve`` gives the
model server (:func:`image_classifier.servable.tuned_thread_counts`); ``default`` lets
TensorFlow pick, as TF Serving does without flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from image_classifier.constants import DEFAULT_MODEL_BASE_PATH
from image_classifier.servable import load_servable, tuned_thread_counts


def images_per_second(servable, batch: int, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    images = np.random.default_rng(0).random((batch, 32, 32, 3), dtype=np.float32)
    for _ in range(3):  # warm-up: graph tracing and oneDNN primitive caches
        servable.predict(images)
    latencies = []
    cpu_started = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 5:
        start = time.perf_counter()
        servable.predict(images)
        latencies.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu_started  # every thread of this process, spinning included
    median = statistics.median(latencies)
    return {
        "batch": batch,
        "calls": len(latencies),
        "median_latency_ms": round(median * 1000, 2),
        "cpu_ms_per_call": round(cpu / len(latencies) * 1000, 2),
        "images_per_second": round(batch / median, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_BASE_PATH)
    parser.add_argument("--version", type=int, help="default: the highest version")
    parser.add_argument("--seconds", type=float, default=10.0, help="per batch size")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--threads", choices=["default", "tuned"], default="default")
    args = parser.parse_args()

    threads = None
    if args.threads == "tuned":
        import tensorflow as tf

        threads = tuned_thread_counts()
        tf.config.threading.set_intra_op_parallelism_threads(threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(threads[1])

    servable = load_servable(args.model_dir, args.version)
    architecture = servable.metadata.get("architecture", {})
    report = {
        "model_version": servable.version,
        "parameters": architecture.get("parameters"),
        "flops_per_image": architecture.get("flops_per_image"),
        "test_time_augmentation": servable.metadata.get("test_time_augmentation"),
        "threads_intra_inter": threads or "TensorFlow's default",
        "results": [
            images_per_second(servable, int(b), args.seconds) for b in args.batch_sizes.split(",")
        ],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
