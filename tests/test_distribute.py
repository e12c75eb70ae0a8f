"""Distributed training: TF_CONFIG, per-worker data shards, and real multi-worker runs.

The runs are the real command line (``python -m image_classifier train --distribute ...``) on a
tiny model and synthetic CIFAR batches: two workers of MultiWorkerMirroredStrategy talking over
127.0.0.1 inside a private network namespace (``tests/cluster.py`` says why), then one worker
alone and the non-distributed path side by side while this process trains under MirroredStrategy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster import unshare_command
from image_classifier.cli import main
from image_classifier.constants import CIFAR10_CLASSES
from image_classifier.data import Dataset, Shard, replica_batch_size
from image_classifier.errors import ConfigError
from image_classifier.train import (
    DISTRIBUTE_MODES,
    TF_CONFIG_ENV,
    TrainResult,
    WorkerRole,
    check_distribute,
    parse_tf_config,
)
from synthetic import synthetic_images, write_cifar_batches

TESTS = Path(__file__).resolve().parent

# --- TF_CONFIG --------------------------------------------------------------------------------


def _config(cluster: object, task: object) -> str:
    return json.dumps({"cluster": cluster, "task": task})


def test_workers_are_numbered_and_worker_0_is_chief() -> None:
    cluster = {"worker": ["a:1", "b:2", "c:3"]}
    roles = [parse_tf_config(_config(cluster, {"type": "worker", "index": i})) for i in range(3)]
    assert [r.worker_id for r in roles] == [0, 1, 2]
    assert [r.is_chief for r in roles] == [True, False, False]
    assert {r.num_workers for r in roles} == {3}


def test_an_explicit_chief_comes_first_and_trains_too() -> None:
    cluster = {"chief": ["c:1"], "worker": ["w0:1", "w1:1"]}
    chief = parse_tf_config(_config(cluster, {"type": "chief", "index": 0}))
    worker0 = parse_tf_config(_config(cluster, {"type": "worker", "index": 0}))
    assert chief == WorkerRole("chief", 0, num_workers=3, worker_id=0, is_chief=True)
    assert (worker0.worker_id, worker0.is_chief) == (1, False)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (None, "needs TF_CONFIG"),
        ("", "needs TF_CONFIG"),
        ("{not json", "not valid JSON"),
        ("[]", "must look like"),
        (_config({}, {"type": "worker", "index": 0}), "must look like"),
        (_config({"worker": ["a:1"], "ps": ["p:1"]}, {"type": "worker", "index": 0}), "'ps'"),
        (_config({"worker": ["a"]}, {"type": "worker", "index": 0}), '"host:port"'),
        (_config({"worker": []}, {"type": "worker", "index": 0}), "non-empty list"),
        (_config({"chief": ["a:1", "b:1"]}, {"type": "chief", "index": 0}), "one chief"),
        (_config({"worker": ["a:1"]}, {"type": "evaluator", "index": 0}), "not in the cluster"),
        (_config({"worker": ["a:1"]}, {"type": "worker", "index": 1}), "index 1"),
        (_config({"worker": ["a:1"]}, {"type": "worker", "index": "0"}), "index '0'"),
        (_config({"worker": ["a:1"]}, {"type": "worker"}), "index None"),
    ],
)
def test_a_bad_tf_config_is_refused_in_one_line(text: str | None, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tf_config(text)
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_distribute_modes_are_the_cli_choices() -> None:
    assert DISTRIBUTE_MODES == ("none", "mirrored", "multi-worker")
    for mode in ("none", "mirrored"):
        assert check_distribute(mode) is None
    with pytest.raises(ConfigError, match="must be one of"):
        check_distribute("parameter-server")


@pytest.mark.parametrize("tf_config", [None, "{", _config({"worker": ["a:1"]}, {"index": 0})])
def test_cli_multi_worker_without_valid_tf_config_exits_2_in_one_line(
    tf_config: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if tf_config is None:
        monkeypatch.delenv(TF_CONFIG_ENV, raising=False)
    else:
        monkeypatch.setenv(TF_CONFIG_ENV, tf_config)
    # The data directory does not even exist: TF_CONFIG is checked before anything is loaded.
    code = main(["train", "--distribute", "multi-worker", "--data-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "TF_CONFIG" in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- per-worker shards --------------------------------------------------------------------------


def test_the_global_batch_must_split_evenly_across_replicas() -> None:
    assert replica_batch_size(512, Shard(1, 2)) == 256
    assert replica_batch_size(512, Shard(0, 2, replicas=4)) == 64
    with pytest.raises(ConfigError, match="multiple of 3"):
        replica_batch_size(512, Shard(0, 3))
    with pytest.raises(ConfigError):
        Shard(2, 2)


def _tiny_dataset(n: int) -> Dataset:
    # The label is the example's id (the pipeline passes labels through untouched), so an
    # example can be followed through shuffling, sharding and augmentation.
    return Dataset(synthetic_images(np.arange(n) % 10, seed=1), np.arange(n), CIFAR10_CLASSES)


def _examples(batches: object) -> list[list[tuple[int, np.ndarray]]]:
    """(id, augmented image) per example, per batch, for one pass over a tf.data pipeline."""
    return [
        list(zip(y.numpy().tolist(), x.numpy(), strict=True))
        for x, y in batches  # type: ignore[attr-defined]
    ]


def test_the_workers_batches_together_are_the_single_machine_batches() -> None:
    """Same images, same augmentation: worker 0's and worker 1's k-th batches are exactly the
    k-th global batch of the non-sharded pipeline, in each of two epochs."""
    from image_classifier.data import make_tf_dataset

    data = _tiny_dataset(70)  # 4 whole global batches of 16, and 6 images over
    single = make_tf_dataset(data, batch_size=16, training=True, seed=3)
    shards = [
        make_tf_dataset(data, batch_size=16, training=True, seed=3, shard=Shard(i, 2))
        for i in range(2)
    ]
    orders = []
    for _epoch in range(2):
        reference = _examples(single)
        parts = [_examples(shard) for shard in shards]
        assert [len(p) for p in parts] == [4, 4]  # whole global batches only, none partial
        assert all(len(batch) == 8 for part in parts for batch in part)
        for k in range(4):
            together = dict(parts[0][k] + parts[1][k])
            expected = dict(reference[k])
            assert sorted(together) == sorted(expected)
            for example, image in together.items():
                # The augmented pixels too: crop and flip seeds travel with the example.
                np.testing.assert_array_equal(image, expected[example])
        orders.append([example for batch in reference for example, _ in batch])
    assert len(set(orders[0][:64])) == 64  # no example twice in an epoch
    assert orders[0] != orders[1]  # and each epoch is reshuffled


@pytest.mark.parametrize("shard", [None, Shard(1, 2)])
def test_the_endless_pipeline_is_the_epochs_one_after_another(shard: Shard | None) -> None:
    """``repeat=True`` (one iterator for a whole run) changes nothing the model sees: its
    batches are exactly those of successive per-epoch iterators, partial last batch, reshuffled
    orders and augmented pixels included."""
    from image_classifier.data import JpegAugment, make_tf_dataset

    data = _tiny_dataset(70)
    settings: dict[str, Any] = {
        "batch_size": 16,
        "training": True,
        "seed": 3,
        "shard": shard,
        "jpeg": JpegAugment(0.5),
    }
    per_epoch = make_tf_dataset(data, **settings)
    epochs = [_examples(per_epoch) for _ in range(3)]
    steps = len(epochs[0])
    assert steps == (5 if shard is None else 4)
    endless = _examples(make_tf_dataset(data, **settings, repeat=True).take(3 * steps))
    assert len(endless) == 3 * steps
    for epoch, expected in enumerate(epochs):
        got = endless[epoch * steps : (epoch + 1) * steps]
        assert [[i for i, _ in batch] for batch in got] == [[i for i, _ in b] for b in expected]
        for batch, reference in zip(got, expected, strict=True):
            for (_, image), (_, wanted) in zip(batch, reference, strict=True):
                np.testing.assert_array_equal(image, wanted)
    assert [i for i, _ in endless[0]] != [i for i, _ in endless[steps]]  # reshuffled


def test_validation_shards_partition_the_validation_set() -> None:
    from image_classifier.data import make_tf_dataset

    data = _tiny_dataset(23)
    seen: list[int] = []
    for index in range(3):
        shard = make_tf_dataset(data, batch_size=6, training=False, shard=Shard(index, 3))
        seen += [example for batch in _examples(shard) for example, _ in batch]
    assert sorted(seen) == list(range(23))


# --- real runs ----------------------------------------------------------------------------------

TRAIN_ARGS = [
    "train",
    "--epochs", "2",
    "--batch-size", "32",
    "--validation-size", "64",
    "--stem-filters", "8,16",
    "--tcn-filters", "16",
    "--learning-rate", "0.2",
    # float32, so two runs of the same arithmetic can be compared tightly.
    "--precision", "float32",
    "--seed", "5",
]  # fmt: skip


@dataclass
class Run:
    name: str
    process: subprocess.Popen[bytes]
    models: Path
    run_dir: Path
    logs: Path

    def log(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def result(self, log: str) -> dict[str, object]:
        """The JSON summary `train` prints last."""
        text = (self.logs / log).read_text(errors="replace")
        return dict(json.loads(text[text.rindex("\n{\n") :]))


def _start(name: str, root: Path, data: Path, workers: int | None) -> Run:
    base = root / name
    models, run_dir, logs = base / "models", base / "run", base / "logs"
    logs.mkdir(parents=True)
    args = [*TRAIN_ARGS, "--data-dir", str(data), "--model-base-path", str(models)]
    args += ["--run-dir", str(run_dir)]
    if workers is None:
        command = [sys.executable, "-m", "image_classifier", *args, "--distribute", "none"]
        log = (logs / "worker-0.log").open("wb")
    else:
        command = [
            *unshare_command(),
            sys.executable, str(TESTS / "cluster.py"), str(logs), str(workers),
            "--", *args, "--distribute", "multi-worker",
        ]  # fmt: skip
        log = (logs / "cluster.log").open("wb")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Run(name, process, models, run_dir, logs)


@dataclass
class Runs:
    processes: dict[str, Run]  # "cluster", "single", "none": the command line, in subprocesses
    mirrored: TrainResult  # train(distribute="mirrored"), in this process


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    pytest.importorskip("tensorflow", reason="training needs TensorFlow")
    root = tmp_path_factory.mktemp("distribute")
    # 5 x 64 images, 64 held out: 256 to train on, 8 whole global batches of 32.
    data = write_cifar_batches(root / "cifar", per_batch=64)
    started: dict[str, Run] = {}
    try:
        # The two workers first, with a core each: they step in lockstep, so sharing the cores
        # with other runs would make each wait for the other's time slice at every step.
        started["cluster"] = _start("cluster", root, data, workers=2)
        started["cluster"].process.wait(timeout=400)
        started["single"] = _start("single", root, data, workers=1)
        started["none"] = _start("none", root, data, workers=None)
        # Meanwhile Keras' fit under MirroredStrategy (this machine's one CPU device), here.
        mirrored = _train_mirrored(root / "mirrored", data)
        for run in started.values():
            run.process.wait(timeout=400)
    finally:
        for run in started.values():
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
    yield Runs(started, mirrored)


def _train_mirrored(root: Path, data: Path) -> TrainResult:
    from image_classifier.data import load_splits
    from image_classifier.model import ModelConfig
    from image_classifier.train import TrainConfig, train

    return train(
        load_splits(data, validation_size=64),
        model_config=ModelConfig(stem_filters=(8, 16), tcn_filters=16),
        train_config=TrainConfig(
            epochs=1, batch_size=32, validation_size=64, precision="float32", verbose=0
        ),
        model_base_path=root / "models",
        run_dir=root / "run",
        distribute="mirrored",
    )


def _weights(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return arrays


def _probe_images() -> np.ndarray:
    return synthetic_images(np.arange(10), seed=11).astype(np.float32) / 255.0


@pytest.mark.slow
def test_two_workers_both_finish_with_equal_weights_and_one_export(runs: Runs) -> None:
    from image_classifier.servable import list_versions

    cluster = runs.processes["cluster"]
    assert cluster.process.returncode == 0, cluster.log()
    chief, worker = cluster.result("worker-0.log"), cluster.result("worker-1.log")
    assert chief["export_dir"] == str(cluster.models / "1")
    assert worker["export_dir"] is None  # only the chief exports
    assert chief["epochs_run"] == worker["epochs_run"] == 2
    assert chief["best_val_accuracy"] == worker["best_val_accuracy"]

    # Each worker checkpointed the same best epoch, and the weights are the same numbers,
    # BatchNorm's moving statistics included.
    chief_weights = _weights(cluster.run_dir / "best.weights.h5")
    worker_weights = _weights(cluster.run_dir / "worker-1" / "best.weights.h5")
    assert chief_weights.keys() == worker_weights.keys() and len(chief_weights) > 20
    for name, value in chief_weights.items():
        np.testing.assert_array_equal(value, worker_weights[name], err_msg=name)

    assert list_versions(cluster.models) == [1]
    assert sorted(p.name for p in cluster.models.iterdir()) == ["1"]  # no staging left over


@pytest.mark.slow
def test_the_chief_export_is_servable_and_says_how_it_was_trained(runs: Runs) -> None:
    from image_classifier.servable import load_servable

    cluster = runs.processes["cluster"]
    assert cluster.process.returncode == 0, cluster.log()
    export = cluster.models / "1"
    probabilities = load_servable(export).predict(_probe_images())
    assert probabilities.shape == (10, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    card = json.loads((export / "metadata.json").read_text())
    distribute = card["training"]["distribute"]
    assert distribute["mode"] == "multi-worker"
    assert distribute["workers"] == 2 and distribute["replicas"] == 2
    assert card["training"]["batch_size"] == 32  # the global batch, as configured


@pytest.mark.slow
def test_one_worker_reproduces_the_non_distributed_run(runs: Runs) -> None:
    from image_classifier.servable import load_servable

    single, plain = runs.processes["single"], runs.processes["none"]
    assert single.process.returncode == 0, single.log()
    assert plain.process.returncode == 0, plain.log()
    histories = [
        json.loads((run.models / "1" / "history.json").read_text()) for run in (single, plain)
    ]
    assert histories[0].keys() == histories[1].keys()
    for key, values in histories[1].items():
        # Both epochs: same batches in the same order, the same updates, the same schedule.
        np.testing.assert_allclose(histories[0][key], values, rtol=1e-4, atol=1e-5, err_msg=key)
    served = [load_servable(run.models / "1").predict(_probe_images()) for run in (single, plain)]
    np.testing.assert_allclose(served[0], served[1], atol=1e-4)


@pytest.mark.slow
def test_mirrored_trains_with_keras_fit_under_the_strategy_and_exports(runs: Runs) -> None:
    """MirroredStrategy over this machine's one CPU device: Keras' own fit, then the export
    from a plain copy of the weights, outside the strategy."""
    from image_classifier.servable import load_servable

    result = runs.mirrored
    assert result.export_dir is not None and result.export_dir.name == "1"
    assert result.epochs_run == 1
    assert result.metadata["training"]["distribute"] == {
        "mode": "mirrored",
        "strategy": "MirroredStrategy",
        "replicas": 1,
    }
    probabilities = load_servable(result.export_dir).predict(_probe_images())
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
