"""README's commands, run as a new user would: every command that uses a shipped picture in
``examples/`` runs in bash against ``image-classifier serve`` with the shipped model, on free
ports, and must answer with predictions (the cat picture as a cat)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from servers import spawn_serve

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
SHIPPED = ROOT / "saved_models" / "image_classifier"


def bash_commands(markdown: str) -> list[str]:
    """The commands of every ```bash block, with ``\\`` continuations and ``|`` pipelines joined
    into one command each; comments dropped."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL):
        current = ""
        for raw in block.splitlines():
            line = raw.split("  #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if not line and not current:
                continue
            current += line.strip() + " " if line.endswith(("\\", "|")) else line.strip()
            if line.endswith("\\"):
                current = current[: current.rstrip().rfind("\\")]
                continue
            if line.endswith("|"):
                continue
            if current:
                commands.append(current.strip())
            current = ""
    return commands


def example_commands() -> list[str]:
    return [c for c in bash_commands(README.read_text(encoding="utf-8")) if "examples/" in c]


def test_the_examples_are_small_redistributable_pictures() -> None:
    listed = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    pictures = sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".jpg", ".png"})
    assert len(pictures) >= 4
    for picture in pictures:
        assert picture.stat().st_size < 16_000, picture  # a few KB each
        assert f"`{picture.name}`" in listed  # each with its source and licence
        with Image.open(picture) as image:
            image.verify()


def test_readme_commands_name_only_shipped_pictures() -> None:
    commands = example_commands()
    assert len(commands) >= 8
    readme = README.read_text(encoding="utf-8")
    for name in re.findall(r"examples/([\w.*-]+\.(?:jpg|png))", readme):
        assert list(EXAMPLES.glob(name)), f"README names examples/{name}, which is not shipped"
    # Nothing in a command block points at a picture that does not exist (cat.jpg of old).
    assert not re.search(r"[@ ]cat\.jpg", "\n".join(bash_commands(readme)))


@pytest.fixture(scope="module")
def serving(gateway_free_port: Callable[[], int]) -> Iterator[dict[str, str]]:
    """``image-classifier serve`` with the shipped model; the URLs README's commands use."""
    port, model_port = gateway_free_port(), gateway_free_port()
    flags = ["--port", str(port), "--model-port", str(model_port)]
    flags += ["--model-grpc-port", str(gateway_free_port()), "--model-base-path", str(SHIPPED)]
    # The default log level, as a user starts it: start-up must be quiet as well as working.
    output: list[str] = []
    process = spawn_serve(*flags, output=output)
    try:
        startup = "".join(output)
        for noise in ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "httpx"):
            assert noise not in startup, f"{noise!r} at start-up:\n{startup}"
        yield {"gateway": str(port), "model": str(model_port)}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("command", example_commands())
def test_readme_command_works(command: str, serving: dict[str, str], tmp_path: Path) -> None:
    # The commands as printed, on this run's ports; run from a scratch directory that has the
    # examples (make-request writes test_data.json where it runs).
    runnable = (
        command.replace("127.0.0.1:8000", f"127.0.0.1:{serving['gateway']}")
        .replace("localhost:8000", f"localhost:{serving['gateway']}")
        .replace("localhost:8501", f"localhost:{serving['model']}")
    )
    (tmp_path / "examples").symlink_to(EXAMPLES)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GATEWAY_URL": f"http://localhost:{serving['gateway']}",
    }
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", runnable.replace("curl ", "curl -sS --fail-with-body ")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, f"{runnable}\n{result.stdout}\n{result.stderr}"
    out = result.stdout
    if "make-request" in command and " -o test_data.json" in command:
        assert "wrote test_data.json" in out
        return
    if "image-classifier predict" in command:
        assert re.search(r"\bcat\b", out), out  # the cat picture is classified as a cat
        return
    body = json.loads(out)
    if command.endswith("/predict-image"):
        assert body["predictions"][0]["label"] == "cat"
    elif command.endswith(("/predict-images", "/predict")):
        assert body["results"] and all(r["predictions"] for r in body["results"]), body
    else:
        assert ":predict" in command, command
        predictions = body["predictions"]
        assert predictions and all(len(row) == 10 for row in predictions)
        assert all(abs(sum(row) - 1) < 1e-4 for row in predictions)


def test_readme_model_figures_are_the_shipped_card() -> None:
    from image_classifier.model_card import figures_markdown, replace_block
    from image_classifier.servable import resolve_version_dir

    shipped = resolve_version_dir(SHIPPED)
    readme = README.read_text(encoding="utf-8")
    block = figures_markdown(shipped)
    # One figure everywhere: README's block is the card (run scripts/sync_readme.py if not).
    assert replace_block(readme, block) == readme
    card = json.loads((shipped / "metadata.json").read_text(encoding="utf-8"))
    evaluation = json.loads((shipped / "evaluation_validation.json").read_text(encoding="utf-8"))
    assert card["metrics"]["validation_accuracy"] == evaluation["accuracy"]
    assert f"**{card['metrics']['validation_accuracy'] * 100:.2f}%**" in block


def test_the_block_says_when_a_time_budget_shortened_the_run(tmp_path: Path) -> None:
    import shutil

    from image_classifier.model_card import EVALUATION_FILE, figures_markdown
    from image_classifier.servable import resolve_version_dir

    shipped = resolve_version_dir(SHIPPED)
    shutil.copy(shipped / EVALUATION_FILE, tmp_path / EVALUATION_FILE)
    card = json.loads((shipped / "metadata.json").read_text(encoding="utf-8"))
    card["training"].update(
        epochs=30,
        epochs_run=24,
        training_seconds=3300.0,
        time_budget={"minutes": 58, "epochs_planned": 24, "stopped_early": True},
    )
    (tmp_path / "metadata.json").write_text(json.dumps(card), encoding="utf-8")

    block = figures_markdown(tmp_path)
    assert "| 55.0 min (24 of 30 epochs, the time budget's) |" in block
    assert "of 30 epochs" not in figures_markdown(shipped)


def test_a_stale_readme_block_is_caught(tmp_path: Path) -> None:
    from image_classifier.model_card import BEGIN, END, figures_markdown, replace_block
    from image_classifier.servable import resolve_version_dir

    block = figures_markdown(resolve_version_dir(SHIPPED))
    stale = f"intro\n{BEGIN}\n| accuracy | 12.34% |\n{END}\noutro\n"
    assert replace_block(stale, block) != stale
    assert replace_block(stale, block) == f"intro\n{block}\noutro\n"
    with pytest.raises(ValueError, match="no generated block"):
        replace_block("no markers here", block)
