"""Gateway settings from the environment, start-up validation, and imports without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import image_classifier.gateway as gateway
from image_classifier.cli import main
from image_classifier.gateway import GatewaySettings, SettingsError, load_settings

_ENV_NAMES = (
    "TF_SERVING_URL",
    "MODEL_NAME",
    *(f"GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields),
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_point_at_local_tf_serving() -> None:
    settings = load_settings()

    assert settings.backend == "tfserving"
    assert settings.tf_serving_url == "http://localhost:8501"
    assert settings.model_name == "image_classifier"
    assert settings.default_top_k == 3
    assert settings.api_key is None
    assert settings.cors_origins == []


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TF_SERVING_URL", "http://tf_serving:8501/")
    monkeypatch.setenv("MODEL_NAME", "other_model")
    monkeypatch.setenv("GATEWAY_MAX_UPLOAD_BYTES", "2048")
    monkeypatch.setenv("GATEWAY_MAX_IMAGES_PER_REQUEST", "4")
    monkeypatch.setenv("GATEWAY_DEFAULT_TOP_K", "5")
    monkeypatch.setenv("GATEWAY_CORS_ORIGINS", "https://a.example, http://localhost:3000")
    monkeypatch.setenv("GATEWAY_API_KEY", "k")
    monkeypatch.setenv("GATEWAY_REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("GATEWAY_MODEL_CARD_PATH", str(tmp_path))

    settings = load_settings()

    assert settings.tf_serving_url == "http://tf_serving:8501"  # trailing slash dropped
    assert settings.model_name == "other_model"
    assert settings.max_upload_bytes == 2048
    assert settings.max_images_per_request == 4
    assert settings.default_top_k == 5
    assert settings.cors_origins == ["https://a.example", "http://localhost:3000"]
    assert settings.api_key_value == "k"
    assert settings.request_timeout_s == 2.5
    assert settings.model_card_path == tmp_path


def test_prefixed_names_and_json_lists_work_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TF_SERVING_URL", "https://serving.internal:9000")
    monkeypatch.setenv("GATEWAY_CORS_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("GATEWAY_API_KEY", "  ")  # blank in a compose file: no key

    settings = load_settings()

    assert settings.tf_serving_url == "https://serving.internal:9000"
    assert settings.cors_origins == ["https://a.example"]
    assert settings.api_key is None


def test_keyword_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_SERVING_URL", "http://from-env:8501")

    settings = load_settings(tf_serving_url="http://from-flag:8501", port=None)

    assert settings.tf_serving_url == "http://from-flag:8501"
    assert settings.port == 8000


@pytest.mark.parametrize(
    ("name", "value", "mentioned"),
    [
        ("TF_SERVING_URL", "ftp://x", "TF_SERVING_URL"),
        ("TF_SERVING_URL", "localhost:8501", "TF_SERVING_URL"),
        ("GATEWAY_DEFAULT_TOP_K", "11", "GATEWAY_DEFAULT_TOP_K"),
        ("GATEWAY_MAX_UPLOAD_BYTES", "lots", "GATEWAY_MAX_UPLOAD_BYTES"),
        ("GATEWAY_MAX_IMAGES_PER_REQUEST", "0", "GATEWAY_MAX_IMAGES_PER_REQUEST"),
        ("GATEWAY_BACKEND", "gpu", "GATEWAY_BACKEND"),
        ("GATEWAY_CORS_ORIGINS", "example.com/path", "GATEWAY_CORS_ORIGINS"),
        ("GATEWAY_REQUEST_TIMEOUT_S", "-1", "GATEWAY_REQUEST_TIMEOUT_S"),
        ("MODEL_NAME", "bad/name", "MODEL_NAME"),
        ("GATEWAY_MODEL_CARD_PATH", "/does/not/exist", "GATEWAY_MODEL_CARD_PATH"),
    ],
)
def test_invalid_settings_fail_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, mentioned: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert mentioned in str(caught.value)


def test_local_backend_needs_an_export(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_BACKEND", "local")
    monkeypatch.setenv("GATEWAY_MODEL_BASE_PATH", str(tmp_path / "nothing"))

    with pytest.raises(SettingsError, match="GATEWAY_MODEL_BASE_PATH"):
        load_settings()


def test_api_key_is_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(api_key=12345678)

    assert "12345678" not in str(caught.value)


def test_gateway_command_refuses_bad_settings_at_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DEFAULT_TOP_K", "99")

    status = main(["gateway", "--port", "8123"])

    assert status == 2
    err = capsys.readouterr().err
    assert "invalid gateway settings" in err
    assert "GATEWAY_DEFAULT_TOP_K" in err


def test_public_surface_resolves() -> None:
    for name in gateway.__all__:
        assert callable(getattr(gateway, name)), name
    with pytest.raises(AttributeError):
        gateway.does_not_exist  # noqa: B018


def _run_without_tensorflow(code: str) -> subprocess.CompletedProcess[str]:
    # `sys.modules["tensorflow"] = None` makes any `import tensorflow` raise ImportError.
    prelude = "import sys\nsys.modules['tensorflow'] = None\nsys.modules['keras'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_gateway_imports_and_builds_without_tensorflow() -> None:
    result = _run_without_tensorflow(
        """
        import image_classifier.gateway as g
        from image_classifier.gateway import create_app, load_settings
        from image_classifier.gateway import backends, pipeline, server
        from image_classifier import cli, supervisor
        app = create_app(load_settings(backend="tfserving"))
        assert type(app.state.backend).__name__ == "TFServingBackend"
        assert sys.modules["tensorflow"] is None, "something imported tensorflow"
        print("ok")
        """
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tfserving_app_serves_requests_without_importing_tensorflow() -> None:
    # Through the lifespan and a real request path (preprocess included), not just the import.
    result = _run_without_tensorflow(
        """
        import io, warnings
        import httpx
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient
        from image_classifier.gateway import create_app, load_settings

        def tf_serving(request):
            if request.url.path.endswith(":predict"):
                return httpx.Response(200, json={"predictions": [[0.1] * 10]})
            return httpx.Response(200, json={"model_version_status": [
                {"version": "3", "state": "AVAILABLE", "status": {"error_code": "OK"}}]})

        app = create_app(load_settings(), transport=httpx.MockTransport(tf_serving))
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), "red").save(buffer, "PNG")
        with TestClient(app) as client:
            response = client.post(
                "/predict-image", files={"file": ("a.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "3"
        assert "tensorflow" not in {m.split(".")[0] for m, v in sys.modules.items() if v}
        print("ok")
        """
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_registration_needs_no_web_stack() -> None:
    # `image-classifier train` builds every subparser; a [train]-only install must not need
    # FastAPI, httpx or pydantic-settings for that, and no command needs TensorFlow to register.
    code = """
        import sys
        for name in ("fastapi", "httpx", "pydantic_settings", "starlette", "uvicorn"):
            sys.modules[name] = None
        from image_classifier.cli import build_parser, serve
        parser = build_parser()
        args = parser.parse_args(["serve", "--port", "9000", "--model-base-path", "m"])
        assert (args.port, args.model_base_path, args.func) == (9000, "m", serve.run)
        args = parser.parse_args(["gateway", "--tf-serving-url", "http://x:1"])
        assert args.tf_serving_url == "http://x:1"
        args = parser.parse_args(["predict", "a.jpg", "b.png", "--json"])
        assert args.images == ["a.jpg", "b.png"] and args.json
        print("ok")
        """
    result = _run_without_tensorflow(code)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
