"""``image-classifier predict``: the command-line client against a gateway over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from image_classifier.cli import main
from image_classifier.constants import CIFAR10_CLASSES

Pictures = dict[str, tuple[str, bytes, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str, str]]:
    """``run(argv) -> (exit status, stdout, stderr)`` of ``image-classifier predict ARGV``."""

    def run_predict(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(["predict", *argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run_predict


@pytest.fixture
def picture_files(tmp_path: Path, gateway_pictures: Pictures) -> dict[str, Path]:
    files = {}
    for key in ("jpeg", "png"):
        name, data, _ = gateway_pictures[key]
        files[key] = tmp_path / name
        files[key].write_bytes(data)
    return files


def test_prints_a_table_per_image(
    gateway_live_url: str,
    picture_files: dict[str, Path],
    gateway_expected: Callable[[bytes], np.ndarray],
    run: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    paths = [str(picture_files["jpeg"]), str(picture_files["png"])]

    status, out, err = run([*paths, "--url", gateway_live_url, "--top-k", "4"])

    assert status == 0, err
    for path in paths:
        expected_label = CIFAR10_CLASSES[int(np.argmax(gateway_expected(Path(path).read_bytes())))]
        assert f"{path}  ->  {expected_label}" in out
    assert out.count("probability") == 2
    assert "image_classifier v1" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "4 "))]) == 4


def test_json_output_is_the_gateway_answer(
    gateway_live_url: str,
    picture_files: dict[str, Path],
    run: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    status, out, _ = run([str(picture_files["png"]), "--url", gateway_live_url, "--json"])

    assert status == 0
    answer = json.loads(out)
    assert answer[0]["image"] == str(picture_files["png"])
    assert len(answer[0]["predictions"]) == 3
    assert answer[0]["model_version"] == "1"


def test_bad_and_missing_images_fail_alone(
    gateway_live_url: str,
    picture_files: dict[str, Path],
    tmp_path: Path,
    run: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    missing = tmp_path / "missing.png"

    status, out, err = run(
        [str(broken), str(missing), str(picture_files["png"]), "--url", gateway_live_url]
    )

    assert status == 1
    assert f"{broken}: error not_an_image (HTTP 400)" in err or "truncated_image" in err
    assert f"{missing}: error unreadable_file" in err
    assert str(picture_files["png"]) in out


def test_unreachable_gateway_is_explained(
    picture_files: dict[str, Path],
    gateway_free_port: Callable[[], int],
    run: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    url = f"http://127.0.0.1:{gateway_free_port()}"

    status, out, err = run([str(picture_files["png"]), "--url", url])

    assert status == 3
    assert out == ""
    assert f"cannot reach the gateway at {url}" in err
    assert "image-classifier serve" in err
