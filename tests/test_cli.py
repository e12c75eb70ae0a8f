"""The `image-classifier` command: help texts, and train -> evaluate -> make-request as a user."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from image_classifier.cli import build_parser, main
from synthetic import encode, synthetic_images, write_cifar_batches

SUBCOMMANDS = (
    "train",
    "evaluate",
    "model-server",
    "make-request",
    "gateway",
    "serve",
    "export",
    "predict",
)


def test_entry_point_help_lists_every_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_classifier", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_explains_itself(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"image-classifier {name}" in text
    assert len(text.splitlines()) > 3  # a description and options, not just a usage line


def test_missing_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--model-dir", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model version under")
    assert "Traceback" not in err


def test_make_request_writes_tf_serving_body(tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(encode(synthetic_images([3])[0], "PNG"))
    output = tmp_path / "test_data.json"
    assert main(["make-request", str(picture), "-o", str(output)]) == 0
    body = json.loads(output.read_text())
    assert list(body) == ["instances"]
    instance = body["instances"][0]
    assert len(instance) == 32 and len(instance[0]) == 32 and len(instance[0][0]) == 3
    assert main(["make-request", str(tmp_path / "missing.png"), "-o", str(output)]) == 2


def test_make_request_takes_several_pictures_and_writes_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from image_classifier.preprocess import preprocess_image

    pictures = []
    for i, image in enumerate(synthetic_images([1, 5, 9])):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(encode(image, "PNG"))
        pictures.append(path)
    names = [str(p) for p in pictures]

    assert main(["make-request", *names, "-o", "-"]) == 0
    floats = json.loads(capsys.readouterr().out)
    assert main(["make-request", *names, "-o", "-", "--format", "pixels"]) == 0
    pixels = json.loads(capsys.readouterr().out)
    assert main(["make-request", *names, "-o", "-", "--format", "bytes"]) == 0
    raw = json.loads(capsys.readouterr().out)

    expected = np.stack([preprocess_image(p.read_bytes()) for p in pictures])
    np.testing.assert_array_equal(np.asarray(floats["instances"], dtype=np.float32), expected)
    assert pixels["signature_name"] == "serving_pixels"
    decoded = [
        np.frombuffer(base64.b64decode(row["b64"]), np.uint8).reshape(32, 32, 3)
        for row in pixels["instances"]
    ]
    # The compact wire carries the very same image: the float path's input is exactly k/255.
    np.testing.assert_array_equal(np.stack(decoded), np.rint(expected * 255).astype(np.uint8))
    np.testing.assert_allclose(np.stack(decoded) / 255.0, expected, rtol=0, atol=1e-7)
    assert raw["signature_name"] == "serving_bytes"
    assert [base64.b64decode(r["b64"]) for r in raw["instances"]] == [
        p.read_bytes() for p in pictures
    ]


def test_make_request_with_one_bad_picture_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode(synthetic_images([2])[0], "PNG"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    output = tmp_path / "out.json"

    assert main(["make-request", str(good), str(bad), "-o", str(output)]) == 2
    assert not output.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and "Traceback" not in err


@pytest.mark.slow
def test_train_then_evaluate_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorflow", reason="training needs TensorFlow")
    data = write_cifar_batches(tmp_path / "cifar", per_batch=40, with_test=True)
    models = tmp_path / "models"
    common = ["--data-dir", str(data)]
    code = main(
        [
            "train",
            *common,
            "--model-base-path",
            str(models),
            "--run-dir",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--validation-size",
            "40",
            "--precision",
            "float32",
            "--stem-filters",
            "8,16",
            "--tcn-filters",
            "16",
            "--no-flip-tta",
        ]
    )
    assert code == 0
    summary = capsys.readouterr().out
    assert json.loads(summary[summary.index("{") :])["export_dir"].endswith("1")
    assert (models / "1" / "saved_model.pb").exists()
    card = json.loads((models / "1" / "metadata.json").read_text())
    assert card["model_config"]["tcn_filters"] == 16
    assert card["test_time_augmentation"] == "none"
    arch = card["architecture"]
    assert sum(arch["parameters_by_part"].values()) == arch["parameters"]
    assert arch["parameters_by_part"]["tcn"] > 0 and arch["flops_by_part"]["tcn"] > 0

    assert main(["evaluate", "--model-dir", str(models), *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "test" and report["num_images"] == 40
    assert set(report["per_class_accuracy"]) >= {"airplane", "truck"}
    assert (models / "1" / "confusion_matrix.png").exists()
    saved = json.loads((models / "1" / "evaluation_test.json").read_text())
    assert saved["accuracy"] == report["accuracy"]

    assert main(["evaluate", "--model-dir", str(models), *common, "--split", "validation"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 40


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ('{"model": {"tcn_filterz": 8}}', "unknown model config keys: ['tcn_filterz']"),
        ('{"train": {"epochz": 1}}', "unknown train config keys: ['epochz']"),
        ('{"model": ', "is not valid JSON"),
        ('{"optimizer": {}}', 'must be a JSON object with "model" and/or "train" keys'),
        ('{"model": [1, 2]}', '"model" in'),
    ],
)
def test_a_bad_train_config_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config_text: str, expected: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(config_text, encoding="utf-8")

    code = main(["train", "--config", str(config), "--data-dir", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_missing_config_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--config", str(tmp_path / "absent.json")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot read") and "absent.json" in err
    assert len(err.strip().splitlines()) == 1, err


def test_an_invalid_model_server_flag_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["model-server", "--rest_api_port", "70000", "--model_name", "a:b"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "rest_api_port" in err and "model_name" in err
    assert len(err.strip().splitlines()) == 1, err


def test_make_request_for_a_missing_picture_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["make-request", str(tmp_path / "absent.jpg"), "-o", str(tmp_path / "out.json")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot access") and "absent.jpg" in err
    assert not (tmp_path / "out.json").exists()


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from image_classifier import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])

    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"image-classifier {__version__}"


def test_every_argument_of_every_command_has_help_text() -> None:
    import argparse

    parser = build_parser()
    subparsers = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in subparsers.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


def test_train_no_tcn_builds_the_ablation() -> None:
    from image_classifier.cli import build_parser
    from image_classifier.cli.train import _MODEL_FLAGS, _given

    args = build_parser().parse_args(["train", "--no-tcn"])
    assert _given(args, _MODEL_FLAGS) == {"tcn": False}
    assert "tcn" not in _given(build_parser().parse_args(["train"]), _MODEL_FLAGS)


def test_train_time_budget_flag_sets_and_lifts_the_configs_limit(tmp_path: Path) -> None:
    from image_classifier.cli.train import _MODEL_FLAGS, _given, _train_overrides
    from image_classifier.train import load_configs

    config = tmp_path / "recipe.json"
    config.write_text('{"train": {"time_budget_minutes": 57}}', encoding="utf-8")

    def budget(*flags: str) -> float | None:
        args = build_parser().parse_args(["train", *flags])
        _, train_config = load_configs(
            config,
            model_overrides=_given(args, _MODEL_FLAGS),
            train_overrides=_train_overrides(args),
        )
        return train_config.time_budget_minutes

    assert budget() == 57
    assert budget("--time-budget-minutes", "45.5") == 45.5
    assert budget("--time-budget-minutes", "0") is None  # no limit


def test_a_negative_time_budget_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--time-budget-minutes", "-5", "--data-dir", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "time_budget_minutes must be positive" in err
    assert len(err.strip().splitlines()) == 1, err


def test_train_stem_and_crop_flags_reach_the_configs() -> None:
    from image_classifier.cli.train import _MODEL_FLAGS, _TRAIN_FLAGS, _given
    from image_classifier.errors import ConfigError
    from image_classifier.train import load_configs

    args = build_parser().parse_args(
        [
            "train",
            "--whiten-patch",
            "2",
            "--token-pool",
            "2",
            "--pooling",
            "blur",
            "--crop-padding",
            "2",
            "--readout",
            "max",
            "--convs-per-block",
            "1",
            "--lookahead",
            "--no-norm-scale",
            "--norm-bias-lr-scale",
            "64",
            "--momentum",
            "0.85",
            "--activation",
            "gelu",
            "--norm-momentum",
            "0.4",
            "--logit-scale",
            "0.125",
            "--dirac-init",
        ]
    )
    model_config, train_config = load_configs(
        None,
        model_overrides=_given(args, _MODEL_FLAGS),
        train_overrides=_given(args, _TRAIN_FLAGS),
    )
    assert (model_config.whiten_patch, model_config.token_pool) == (2, 2)
    assert model_config.pooling == "blur"
    assert (model_config.readout, model_config.convs_per_block) == ("max", 1)
    assert train_config.crop_padding == 2
    assert train_config.lookahead
    assert not model_config.norm_scale and train_config.norm_bias_lr_scale == 64
    assert train_config.momentum == 0.85
    assert (model_config.activation, model_config.norm_momentum) == ("gelu", 0.4)
    assert model_config.logit_scale == 0.125 and model_config.dirac_init
    with pytest.raises(ConfigError, match="crop_padding"):
        load_configs(None, train_overrides={"crop_padding": -1})
    with pytest.raises(ConfigError, match="momentum"):
        load_configs(None, train_overrides={"momentum": 1.0})


def test_tensorflow_notices_are_dropped_and_everything_else_passes(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # C++ writes to the file descriptor, so the filter works on fd 2, not on sys.stderr.
    import os

    from image_classifier.tfnotices import FLOAT16_NOTICE, stderr_without

    with stderr_without((FLOAT16_NOTICE,)):
        os.write(2, f"E0000 util.cc:131] {FLOAT16_NOTICE}. Falling back to Eigen.\n".encode())
        os.write(2, b"a real error\n")
    err = capfd.readouterr().err
    assert err == "a real error\n"


def test_exporting_and_loading_float16_weights_print_no_tensorflow_notice(
    tmp_path: Path,
) -> None:
    """In a fresh process (the notice prints once per process): an export, whose float16
    variables are the process's first float16 op, then a load, as a server does. (A server that
    only loads is covered by README's start-up test.)"""
    code = f"""
import numpy as np
from image_classifier.constants import CIFAR10_CLASSES
from image_classifier.export import export_model
from image_classifier.model import ModelConfig, build_model
from image_classifier.servable import load_servable

config = ModelConfig(stem_filters=(8, 16), tcn_filters=16)
version_dir = export_model(
    build_model(config), config, {str(tmp_path)!r}, class_names=CIFAR10_CLASSES, metadata={{}}
)
print(load_servable(version_dir).predict(np.zeros((1, 32, 32, 3), "f4")).shape)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "(1, 10)"
    assert "DT_HALF" not in done.stderr, done.stderr
