"""Deployment files: Kubernetes manifests against the Kubernetes schemas (offline, pinned
version), yamllint on every YAML file, the compose stack's structure, the Dockerfiles'
structure (Docker itself is not needed), and the container health check against the real
server.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from export.repository import TARGET_MODELS
from server.api.voicegate.v1 import speaker_pb2
from server.config import ENV_PREFIX, Settings
from server.triton_process import free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
DOCKER = DEPLOY / "docker"

# Kubernetes version the manifests are written for (native gRPC probes: >= 1.27).
KUBERNETES_VERSION = "1.32.0"
SPEAKER_SERVICE = speaker_pb2.DESCRIPTOR.services_by_name["SpeakerService"].full_name
GPU_MODELS = set(TARGET_MODELS["gpu"])
PLACEHOLDER = "REPLACE-ME"
# The Secrets as placeholders: validated here, never applied by `kubectl apply -k`.
SECRETS_TEMPLATE = K8S / "secrets.example.yaml"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_all(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} manifests"
    return matches[0]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    return found


def env_settings(env: dict[str, str]) -> Settings:
    """The settings the front server would build from this environment (validated).

    A misspelt VOICEGATE_* name would be ignored silently by the server: fail on it here."""
    unknown = {
        key
        for key in env
        if key.startswith(ENV_PREFIX)
        and key.removeprefix(ENV_PREFIX).lower() not in Settings.__dataclass_fields__
    }
    assert not unknown, f"not a setting: {sorted(unknown)}"
    return Settings.load(environ={k: str(v) for k, v in env.items()})


# --- yamllint -----------------------------------------------------------------------------


def test_yamllint_passes_on_every_yaml_file() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "yamllint", "--list-files", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    linted = {Path(p).resolve() for p in listed}
    expected = {*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), ROOT / "buf.yaml"}
    assert expected <= linted, "files hidden from yamllint"
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "--format", "parsable", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ---------------------------------------------------------------------------


def manifest_ids() -> Iterator[Any]:
    for path in manifest_files():
        for doc in load_all(path):
            yield pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("manifest", manifest_ids())
def test_manifest_matches_the_kubernetes_schema(manifest: dict[str, Any]) -> None:
    # strict: unknown fields (a misspelt probe, a misplaced key) are errors too
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_schema_check_rejects_a_misspelt_field() -> None:
    broken = find("Deployment", "voicegate")
    broken = yaml.safe_load(yaml.safe_dump(broken))
    probe = container(broken, "voicegate").pop("readinessProbe")
    container(broken, "voicegate")["readinesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_placeholders() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    applied = [p.name for p in manifest_files() if p != SECRETS_TEMPLATE]
    assert sorted(kustomization["resources"]) == applied
    assert kustomization["namespace"] == "voicegate"
    images = {image["name"] for image in kustomization["images"]}
    used = {
        c["image"]
        for m in manifests()
        if m["kind"] == "Deployment"
        for c in pod_spec(m)["containers"] + pod_spec(m).get("initContainers", [])
    }
    assert images <= used


def test_kustomize_build_renders_valid_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize rendering is not checked")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert len(docs) == len(manifests()) - len(load_all(SECRETS_TEMPLATE))
    assert "Secret" not in {doc["kind"] for doc in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "voicegate"
    images = {
        c["image"]
        for doc in docs
        if doc["kind"] == "Deployment"
        for c in pod_spec(doc)["containers"] + pod_spec(doc).get("initContainers", [])
    }
    assert all(":" in image for image in images), images  # every image has a tag


def test_every_container_has_requests_and_limits() -> None:
    for deployment in (m for m in manifests() if m["kind"] == "Deployment"):
        spec = pod_spec(deployment)
        for c in spec["containers"] + spec.get("initContainers", []):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)


def test_triton_gets_a_gpu_and_its_model_repository() -> None:
    triton = find("Deployment", "triton")
    server = container(triton, "triton")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", server["image"])
    for kind in ("requests", "limits"):
        assert server["resources"][kind]["nvidia.com/gpu"] == 1
    assert triton["spec"]["strategy"]["type"] == "Recreate"  # one GPU: free it before the next
    assert "--model-repository=/models" in server["args"]
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    (init,) = pod_spec(triton)["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    volume = mounts["/models"]
    assert init_mounts[volume] in init["command"][-1]  # the initContainer fills that volume
    volumes = {v["name"] for v in pod_spec(triton)["volumes"]}
    assert {volume, mounts["/dev/shm"]} <= volumes
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert f"--grpc-port={ports['grpc']}" in server["args"]
    assert f"--metrics-port={ports['metrics']}" in server["args"]


def test_front_server_probes_use_the_grpc_health_service() -> None:
    deployment = find("Deployment", "voicegate")
    server = container(deployment, "voicegate")
    grpc_port = {p["name"]: p["containerPort"] for p in server["ports"]}["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port, probe
    assert server["readinessProbe"]["grpc"]["service"] == SPEAKER_SERVICE
    assert server["startupProbe"]["grpc"]["service"] == SPEAKER_SERVICE
    # A Triton restart (readiness NOT_SERVING for a while) must not restart the front
    # servers: liveness asks the entry that stays SERVING while the process runs.
    from server.app import LIVENESS_SERVICE

    assert server["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE


def test_front_server_runs_unprivileged_and_drains_on_shutdown() -> None:
    deployment = find("Deployment", "voicegate")
    spec = pod_spec(deployment)
    server = container(deployment, "voicegate")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/tmp"}
    config = find("ConfigMap", "voicegate-config")["data"]
    grace = float(config["VOICEGATE_GRACE_SECONDS"])
    pre_stop = float(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 5


def pod_environment(deployment: dict[str, Any], name: str) -> dict[str, str]:
    """The container's environment: its ConfigMaps, then `env` (Secret values: placeholders)."""
    server = container(deployment, name)
    env: dict[str, str] = {}
    for source in server.get("envFrom", []):
        env.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in server.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = find("Secret", ref["name"])["stringData"][ref["key"]]
    return env


def test_front_server_configuration_is_valid_and_points_at_triton() -> None:
    deployment = find("Deployment", "voicegate")
    settings = env_settings(pod_environment(deployment, "voicegate"))
    assert not settings.embedded_triton
    assert set(settings.encoder_models) <= GPU_MODELS  # what the gpu repository serves
    host, port = settings.triton_url.rsplit(":", 1)  # type: ignore[union-attr]
    service = find("Service", host)
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert int(port) == grpc_port
    ports = {p["name"]: p["containerPort"] for p in container(deployment, "voicegate")["ports"]}
    assert (settings.port, settings.metrics_port) == (ports["grpc"], ports["metrics"])
    # Several replicas (HPA) must share one speaker store: PostgreSQL, never a pod's SQLite.
    assert find("HorizontalPodAutoscaler", "voicegate")["spec"]["minReplicas"] > 1
    assert settings.speaker_store_url.startswith("postgresql://")
    assert str(settings.state_dir).startswith("/tmp/")  # the pod's only writable mount


def test_services_and_policies_select_the_right_pods() -> None:
    deployments = {m["metadata"]["name"]: m for m in manifests() if m["kind"] == "Deployment"}
    labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for name, deployment in deployments.items():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels[name].items()

    def selected(selector: dict[str, str]) -> list[str]:
        return [name for name, pod in labels.items() if selector.items() <= pod.items()]

    for service in (m for m in manifests() if m["kind"] == "Service"):
        (target,) = selected(service["spec"]["selector"])
        ports = {
            p["name"]
            for c in pod_spec(deployments[target])["containers"]
            for p in c.get("ports", [])
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports, service

    hpa = find("HorizontalPodAutoscaler", "voicegate")
    ref = hpa["spec"]["scaleTargetRef"]
    assert ref["kind"] == "Deployment" and ref["name"] in deployments
    pdb = find("PodDisruptionBudget", "voicegate")
    assert selected(pdb["spec"]["selector"]["matchLabels"]) == [ref["name"]]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]

    ingress = find("Ingress", "voicegate")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    find("Service", backend["name"])
    policy = find("NetworkPolicy", "triton")
    assert selected(policy["spec"]["podSelector"]["matchLabels"]) == ["triton"]


def test_secrets_are_placeholders_and_are_used() -> None:
    secrets = {m["metadata"]["name"]: m for m in manifests() if m["kind"] == "Secret"}
    assert secrets
    assert {m["kind"] for m in load_all(SECRETS_TEMPLATE)} == {"Secret"}
    for name, secret in secrets.items():
        assert "data" not in secret, f"{name}: use stringData placeholders, never real data"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"secret {name} key {key} is not a placeholder"
    assert find("Ingress", "voicegate")["spec"]["tls"][0]["secretName"] in secrets
    for deployment in (m for m in manifests() if m["kind"] == "Deployment"):
        for pull in pod_spec(deployment)["imagePullSecrets"]:
            assert pull["name"] in secrets


# --- compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return document


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def default_of(value: str) -> str:
    """`${NAME:-default}` → default (compose interpolation, as when NAME is unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_has_the_four_services_with_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"triton", "voicegate", "otel-collector", "prometheus"} <= set(services)
    for name in ("triton", "voicegate", "prometheus"):
        check = services[name]["healthcheck"]["test"]
        assert check[0] == "CMD" and len(check) > 1, name
    assert services["voicegate"]["healthcheck"]["test"][1:3] == ["voicegate", "health"]
    depends = services["voicegate"]["depends_on"]
    assert depends["triton"]["condition"] == "service_healthy"
    assert services["export"]["profiles"] == ["export"]  # one-off, not part of `up`


def test_compose_triton_reserves_a_gpu_and_serves_the_gpu_repository(
    compose: dict[str, Any],
) -> None:
    triton = compose["services"]["triton"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", default_of(triton["image"]))
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == 1
    (volume,) = triton["volumes"]
    source, target, *_ = default_of(volume).split(":")
    assert target == "/models" and "--model-repository=/models" in triton["command"]
    assert (COMPOSE_DIR / source).resolve() == ROOT / "build" / "model_repository_gpu"
    export = compose["services"]["export"]
    out = next(v for v in export["volumes"] if v.endswith(":/out"))
    assert (COMPOSE_DIR / out.split(":")[0]).resolve() == ROOT / "build"


def test_compose_front_server_points_at_triton(compose: dict[str, Any]) -> None:
    services = compose["services"]
    voicegate = services["voicegate"]
    settings = env_settings(compose_env(voicegate))
    assert set(settings.encoder_models) <= GPU_MODELS
    host, port = settings.triton_url.rsplit(":", 1)  # type: ignore[union-attr]
    assert host == "triton" and port in {str(p).split()[0] for p in services["triton"]["expose"]}
    build = voicegate["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).is_file()
    assert voicegate["ports"] == [f"{settings.port}:{settings.port}"]
    assert voicegate["read_only"] is True
    # The SQLite speaker store lives on a named volume, not in the container or its tmpfs.
    store = Path(settings.speaker_store_url.removeprefix("sqlite:///"))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in voicegate["volumes"]}
    assert store.parent.as_posix() in mounts
    assert mounts[store.parent.as_posix()] in compose["volumes"]


def test_compose_telemetry_is_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {}
    for name in ("otel-collector", "prometheus"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE_DIR / source).is_file(), volume
                mounts[name] = COMPOSE_DIR / source
    collector = yaml.safe_load(mounts["otel-collector"].read_text())
    pipelines = collector["service"]["pipelines"]
    for pipeline in pipelines.values():
        for part in ("receivers", "processors", "exporters"):
            assert set(pipeline[part]) <= set(collector[part]), part
    assert set(collector["service"]["extensions"]) <= set(collector["extensions"])

    env = compose_env(services["voicegate"])
    otlp_port = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rsplit(":", 1)[1]
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(f":{otlp_port}") and "otlp" in pipelines["metrics"]["receivers"]

    prometheus = yaml.safe_load(mounts["prometheus"].read_text())
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    triton_metrics = next(a for a in services["triton"]["command"] if "--metrics-port=" in a)
    assert f"triton:{triton_metrics.split('=')[1]}" in targets
    assert f"voicegate:{env['VOICEGATE_METRICS_PORT']}" in targets
    exporter = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert f"otel-collector:{exporter}" in targets


# --- Dockerfiles (structure only: no Docker engine here) -----------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages(path: Path) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


@pytest.mark.parametrize("name", ["server.Dockerfile", "export.Dockerfile"])
def test_dockerfile_is_multi_stage_and_ends_unprivileged(name: str) -> None:
    path = DOCKER / name
    built = stages(path)
    assert len(built) >= 2, "multi-stage"
    users = [args for word, args in built[-1] if word == "USER"]
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # BuildKit reads NAME.dockerignore beside the Dockerfile: deny everything, allow a list.
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    assert "*" in ignore
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for stage in built:
        for word, args in stage:
            if word == "COPY" and "--from=" not in args:
                *sources, _ = shlex.split(args)
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert any(source.rstrip("/").startswith(a) for a in allowed), (
                        f"{source} is excluded by {name}.dockerignore"
                    )


def test_server_image_has_a_grpc_health_check_stubs_and_no_torch() -> None:
    path = DOCKER / "server.Dockerfile"
    final = stages(path)[-1]
    (health,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert '"voicegate", "health"' in health
    runs = " ".join(args for stage in stages(path) for word, args in stage if word == "RUN")
    assert "make stubs" in runs
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert any("/src" in i for i in installs)
    assert not any("[" in i and "/src" in i for i in installs), "no extras in the server image"
    assert "torch" not in " ".join(installs)
    assert ("ENTRYPOINT", '["voicegate"]') in final and ("CMD", '["serve"]') in final
    # The runtime stage only takes the installed environment from the build stage.
    assert [args for word, args in final if word == "COPY"] == [
        "--from=build /opt/voicegate /opt/voicegate"
    ]


def test_export_image_exports_the_gpu_target() -> None:
    text = (DOCKER / "export.Dockerfile").read_text()
    assert "voicegate export --target gpu" in text
    names = [stage[0][1].split()[-1] for stage in stages(DOCKER / "export.Dockerfile")]
    assert names == ["exporter", "devdata", "repository", "models"]


def test_server_image_build_steps_without_docker(tmp_path: Path) -> None:
    """The build stage of server.Dockerfile, replayed on what its .dockerignore admits: `make
    stubs` with another Python gives the stubs `make proto` gives, and the wheel `pip install
    /src` builds holds them and the calibration, without the export package or torch."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    context = tmp_path / "src"
    ignore = (DOCKER / "server.Dockerfile.dockerignore").read_text().splitlines()
    for line in ignore:
        if line.startswith("!"):
            source = ROOT / line[1:].rstrip("/")
            target = context / line[1:].rstrip("/")
            if source.is_dir():
                shutil.copytree(
                    source,
                    target,
                    ignore=lambda folder, names: [
                        n
                        for n in names
                        if n == "__pycache__" or (Path(folder) == ROOT / "server" and n == "api")
                    ],
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
    assert not (context / "server" / "api").exists()
    subprocess.run(
        [make, "-s", "stubs", f"PROTOC_PYTHON={sys.executable}"],
        cwd=context,
        check=True,
        capture_output=True,
        timeout=120,
    )

    def stubs(root: Path) -> dict[Path, bytes]:
        return {
            p.relative_to(root): p.read_bytes()
            for p in (root / "server" / "api").rglob("*")
            if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
        }

    assert stubs(context) == stubs(ROOT)

    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    result = subprocess.run(
        [sys.executable, "-c", build],
        cwd=context,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheel = context / "dist" / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert {
        "server/api/voicegate/v1/speaker_pb2_grpc.py",
        "server/api/voicegate/v1/audio_pb2.py",
        "server/calibration.json",
        "server/cli.py",
    } <= names
    assert not any(name.startswith("export/") for name in names)
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if re.match(r"(torch|nvidia-pytriton|onnx)\b", r)], base


def test_front_server_dependencies_contain_no_torch() -> None:
    """What `pip install .` (no extras) brings into the server image, from installed metadata."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    seen: set[str] = set()
    missing: list[str] = []
    queue = [Requirement(r) for r in project["dependencies"]]
    while queue:
        requirement = queue.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        for text in requires:
            dependency = Requirement(text)
            extras = requirement.extras or {""}
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                queue.append(dependency)
    assert {"grpcio", "numpy", "tritonclient", "onnxruntime"} <= seen
    assert not missing, f"not installed, so not checked: {missing}"
    assert not seen & {"torch", "nvidia-pytriton", "onnx", "resemblyzer"}
    assert not {"torch", "nvidia-pytriton"} & {Requirement(r).name for r in project["dependencies"]}


# --- the container health check, against the real server ----------------------------------


@pytest.mark.integration
async def test_health_command_reports_serving(app: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    target = f"127.0.0.1:{app.port}"
    assert await asyncio.to_thread(main, ["health", "--server", target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    args = ["health", "--server", target, "--service", SPEAKER_SERVICE]
    assert await asyncio.to_thread(main, args) == 0
    args = ["health", "--server", target, "--service", "no.such.Service"]
    assert await asyncio.to_thread(main, args) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


async def test_health_command_fails_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    args = ["health", "--server", f"127.0.0.1:{free_ports(1)[0]}", "--timeout", "2"]
    assert await asyncio.to_thread(main, args) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
