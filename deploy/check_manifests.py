"""Static checks of the deployment files that `docker compose config` does not do.

Usage (deploy/compose-check.sh calls it):
    python deploy/check_manifests.py [--root DIR] [--k8s DIR] [--otel FILE] [--compose-json FILE]

- Kubernetes (--k8s, default deploy/k8s): every *.yaml / *.yml parses (multi-document); every
  object has apiVersion, kind and metadata.name; no object is defined twice; kustomization.yaml
  lists files that exist and every manifest file is listed; workloads: selector matches the pod
  labels, containers have an image, probe and Service ports exist, volume mounts, ConfigMap and
  Secret references (and secret keys) resolve; Services select an existing workload.
- Both: every LLM Studio service has its own NATS user, password and signing key, trusts the
  TLS CA, and one with a gRPC API serves TLS with its own certificate and key (and has no probe
  or healthcheck that speaks plaintext to it); nats-server's config has a tls block whose
  certificate and key are mounted.
- Both, least privilege: every service connects to PostgreSQL as its own role
  (llmstudio_<service>, never the superuser) to its own database, with the password from its
  own secret file (none in the URL); every service that uses the artifact store (it calls
  `artifact_store()` in services/<service>/app.py) is its own MinIO user (llmstudio-<service>,
  never the root user) with its secret key from its own secret file (never in the environment);
  the others get no S3 credentials at all. Compose: minio-init and postgres-init get each
  service's secret to create its user (with its policy: only its bucket, no wildcard action) and
  role.
- Both: every LLM Studio service (a package with __main__.py under services/) is deployed, and
  every one with a gRPC API is where the others look for it: each service's environment has
  LLMSTUDIO_<SERVICE>_ADDR = <service>:<its LLMSTUDIO_GRPC_PORT> (compose DNS / k8s Service).
- OpenTelemetry collector config (--otel): parses; every component a pipeline uses is defined.
- Compose (--compose-json: the output of `docker compose config --format json`, i.e. the
  resolved model): build contexts, Dockerfiles and build targets exist; bind-mount sources
  exist; a `service_healthy` dependency has a healthcheck.

Prints one line per problem and exits 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# ----------------------------------------------------------------------------- Kubernetes
def load_documents(path: Path, errors: list[str]) -> list[dict]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        errors.append(f"{path}: invalid YAML: {exc}")
        return []
    out = []
    for i, doc in enumerate(docs):
        if doc is None:  # empty document (e.g. a trailing '---')
            continue
        if not isinstance(doc, dict):
            errors.append(f"{path}: document {i}: expected a mapping, got {type(doc).__name__}")
            continue
        out.append(doc)
    return out


def _pod_spec(obj: dict) -> dict:
    return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}


def _secret_files(module: str, serves_grpc: bool) -> dict[str, tuple[str, str]]:
    """What a service reads from /run/secrets: env var -> (file, the secret key it must be;
    llmstudio credentials and llmstudio certs name them so)."""
    files = {var: (target, f"{module}{suffix}" if suffix else target)
             for var, (target, suffix) in CREDENTIAL_FILES.items()}
    if serves_grpc:
        files.update({var: (target, f"{module}{suffix}")
                      for var, (target, suffix) in TLS_SERVER_FILES.items()})
    return files


def _k8s_credentials(where: str, container: dict, volumes: dict,
                     config_env: dict[str, str], secret_value=lambda name, key: None) -> list[str]:
    """An LLM Studio service's container has its own NATS user, its own password and signing
    key, the TLS CA and (with a gRPC API) its own certificate and key mounted where the
    configuration (its env and envFrom ConfigMaps: `config_env`) says."""
    module = next((a.split(".", 1)[1] for a in container.get("args") or []
                   if a.startswith("services.")), None)
    if module is None:
        return []
    errors = []
    env = {**config_env, **{e.get("name"): e.get("value") for e in container.get("env") or []}}
    if env.get("LLMSTUDIO_NATS_USER") != module:
        errors.append(f"{where}: LLMSTUDIO_NATS_USER must be its own user {module!r}")
    mount = next((m for m in container.get("volumeMounts") or []
                  if m.get("mountPath") == "/run/secrets"), None)
    sources = ((volumes.get(mount.get("name")) or {}).get("projected") or {}).get("sources") \
        if mount else None
    items = {i.get("path"): i.get("key") for src in sources or []
             for i in (src.get("secret") or {}).get("items") or []}
    owned = {i.get("path"): ((src.get("secret") or {}).get("name"), i.get("key"))
             for src in sources or [] for i in (src.get("secret") or {}).get("items") or []}
    for e in container.get("env") or []:  # a URL from a Secret: its value here, if defined
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref and e.get("name") == "LLMSTUDIO_DATABASE_URL":
            env[e["name"]] = secret_value(ref.get("name"), ref.get("key"))
    errors += _least_privilege(where, module, env, owned, "k8s")
    serves_grpc = "LLMSTUDIO_GRPC_PORT" in env
    for var, (path, key) in _secret_files(module, serves_grpc).items():
        if env.get(var) != f"/run/secrets/{path}":
            errors.append(f"{where}: {var} must be /run/secrets/{path}")
        if items.get(path) != key:
            errors.append(f"{where}: /run/secrets/{path} must be the secret key {key!r}, "
                          f"not {items.get(path)!r}")
    if serves_grpc:
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "grpc" in (container.get(probe_name) or {}):
                errors.append(f"{where}: {probe_name}.grpc cannot speak TLS to its gRPC port "
                              "(use the exec probe)")
    return errors


def _nats_tls_files(conf: str) -> list[str] | None:
    """The certificate and key files of a nats-server config's tls block; None without one."""
    block = re.search(r"^\s*tls\s*\{(.*?)^\s*\}", conf, re.S | re.M)
    if block is None:
        return None
    return re.findall(r"^\s*(?:cert_file|key_file)\s*:\s*\"?([^\"\s]+)", block.group(1), re.M)


def _k8s_nats_tls(where: str, container: dict, volumes: dict, configmap) -> list[str]:
    """nats-server's config (a ConfigMap in a projected volume) has a tls block, and the files
    it names are projected next to it."""
    command = container.get("command") or []
    if "nats-server" not in command or "--config" not in command:
        return []
    config = Path(command[command.index("--config") + 1])
    mount = next((m for m in container.get("volumeMounts") or []
                  if m.get("mountPath") == str(config.parent)), None)
    sources = ((volumes.get(mount.get("name")) or {}).get("projected") or {}).get("sources") \
        if mount else []
    conf, projected = None, set()
    for src in sources or []:
        for kind in ("secret", "configMap"):
            for item in (src.get(kind) or {}).get("items") or []:
                projected.add(str(config.parent / item.get("path", "")))
        name = (src.get("configMap") or {}).get("name")
        if name and configmap(name) and config.name in configmap(name):
            conf = configmap(name)[config.name]
            projected.add(str(config))
    if conf is None:
        return [f"{where}: its config {config} is not a projected ConfigMap key"]
    files = _nats_tls_files(conf)
    if not files:
        return [f"{where}: {config} has no tls block with cert_file and key_file (TLS only)"]
    return [f"{where}: {config}'s tls file {f} is not mounted" for f in files
            if f not in projected]


def llmstudio_services(root: Path = ROOT) -> set[str]:
    """Every LLM Studio service: the packages under services/ run with `python -m`."""
    return {p.parent.name for p in (root / "services").glob("*/__main__.py")}


def _grpc_ports(deployed: list[tuple[str, str, dict]]) -> dict[str, int]:
    """module -> the gRPC port it listens on (LLMSTUDIO_GRPC_PORT), for those with one."""
    ports = {}
    for _, module, env in deployed:
        port = str(env.get("LLMSTUDIO_GRPC_PORT") or "")
        if port.isdigit():
            ports[module] = int(port)
    return ports


def _deployed_and_reachable(where: str, deployed: list[tuple[str, str, dict]]) -> list[str]:
    """Every LLM Studio service runs here, and each finds every gRPC API at <service>:<port>.
    `deployed`: (where, module, its resolved environment) per container / compose service."""
    errors = [f"{where}: nothing runs services.{m} (every LLM Studio service is deployed)"
              for m in sorted(llmstudio_services() - {m for _, m, _ in deployed})]
    for module, port in sorted(_grpc_ports(deployed).items()):
        var, want = f"LLMSTUDIO_{module.upper()}_ADDR", f"{module}:{port}"
        for who, _, env in deployed:
            if env.get(var) != want:
                errors.append(f"{who}: {var} must be {want!r}, not {env.get(var)!r}")
    return errors


def check_k8s(directory: Path) -> list[str]:
    errors: list[str] = []
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        return [f"{directory}: no YAML files"]

    objects: list[tuple[Path, dict]] = []
    kustomization: tuple[Path, dict] | None = None
    for path in files:
        for doc in load_documents(path, errors):
            where = f"{path.name}"
            if "kind" not in doc or "apiVersion" not in doc:
                errors.append(f"{where}: object without apiVersion/kind: {str(doc)[:80]}")
                continue
            if doc["kind"] == "Kustomization":
                kustomization = (path, doc)
                continue
            name = (doc.get("metadata") or {}).get("name")
            if not name:
                errors.append(f"{where}: {doc['kind']} without metadata.name")
                continue
            objects.append((path, doc))

    # duplicates
    seen: dict[tuple[str, str], str] = {}
    for path, obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in seen:
            errors.append(f"{path.name}: {key[0]}/{key[1]} already defined in {seen[key]}")
        seen[key] = path.name

    # kustomization: listed files exist, every manifest file is listed
    if kustomization is None:
        errors.append(f"{directory}: no kustomization.yaml")
    else:
        kpath, kdoc = kustomization
        listed = set()
        for res in kdoc.get("resources") or []:
            target = (directory / res).resolve()
            if not target.exists():
                errors.append(f"{kpath.name}: resource {res!r} does not exist")
            listed.add(target)
        for path in files:
            if path != kpath and path.resolve() not in listed:
                errors.append(f"{kpath.name}: {path.name} is not listed in resources")

    by_kind: dict[str, dict[str, dict]] = {}
    for _, obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    def secret_keys(name: str) -> set[str] | None:
        s = by_kind.get("Secret", {}).get(name)
        if s is None:
            return None
        return set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())

    def configmap_keys(name: str) -> set[str] | None:
        c = by_kind.get("ConfigMap", {}).get(name)
        if c is None:
            return None
        return set((c.get("data") or {}).keys()) | set((c.get("binaryData") or {}).keys())

    def secret_data(name: str) -> dict[str, str]:
        s = by_kind.get("Secret", {}).get(name) or {}
        return {**(s.get("data") or {}), **(s.get("stringData") or {})}

    def configmap_data(name: str) -> dict[str, str]:
        return (by_kind.get("ConfigMap", {}).get(name) or {}).get("data") or {}

    workloads: list[tuple[Path, dict]] = [(p, o) for p, o in objects if o["kind"] in WORKLOAD_KINDS]
    deployed: list[tuple[str, str, dict]] = []  # (where, module, its environment)
    for path, obj in workloads:
        where = f"{path.name}: {obj['kind']}/{obj['metadata']['name']}"
        spec = obj.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if obj["kind"] != "Job":
            match = (spec.get("selector") or {}).get("matchLabels") or {}
            if not match:
                errors.append(f"{where}: no spec.selector.matchLabels")
            for k, v in match.items():
                if labels.get(k) != v:
                    errors.append(f"{where}: selector {k}={v} does not match the pod labels")
        if obj["kind"] == "StatefulSet":
            svc = spec.get("serviceName")
            if svc and svc not in by_kind.get("Service", {}):
                errors.append(f"{where}: serviceName {svc!r} is not a Service defined here")
        pod = _pod_spec(obj)
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for vct in spec.get("volumeClaimTemplates") or []:
            volumes[(vct.get("metadata") or {}).get("name")] = vct
        for vname, vol in volumes.items():
            cm = (vol.get("configMap") or {}).get("name")
            if cm and configmap_keys(cm) is None and not vol["configMap"].get("optional"):
                errors.append(f"{where}: volume {vname!r}: ConfigMap {cm!r} is not defined")
            sec = (vol.get("secret") or {}).get("secretName")
            if sec and secret_keys(sec) is None and not vol["secret"].get("optional"):
                errors.append(f"{where}: volume {vname!r}: Secret {sec!r} is not defined")
            for source in (vol.get("projected") or {}).get("sources") or []:
                for kind, keys_of in (("secret", secret_keys), ("configMap", configmap_keys)):
                    ref = source.get(kind)
                    if not ref:
                        continue
                    keys = keys_of(ref.get("name"))
                    if keys is None:
                        errors.append(f"{where}: volume {vname!r}: {kind} {ref.get('name')!r} "
                                      "is not defined")
                        continue
                    for item in ref.get("items") or []:
                        if item.get("key") not in keys:
                            errors.append(f"{where}: volume {vname!r}: {kind} {ref.get('name')!r}"
                                          f" has no key {item.get('key')!r}")
        containers = list(pod.get("containers") or [])
        if not containers:
            errors.append(f"{where}: no containers")
        for c in containers + list(pod.get("initContainers") or []):
            cwhere = f"{where} container {c.get('name')!r}"
            if not c.get("name") or not c.get("image"):
                errors.append(f"{cwhere}: needs a name and an image")
            ports = c.get("ports") or []
            port_numbers = {p.get("containerPort") for p in ports}
            port_names = {p.get("name") for p in ports if p.get("name")}
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                if "grpc" in probe:
                    port = (probe["grpc"] or {}).get("port")
                    if not isinstance(port, int):
                        errors.append(
                            f"{cwhere}: {probe_name}.grpc.port must be a number, got {port!r}"
                        )
                    elif port not in port_numbers:
                        errors.append(
                            f"{cwhere}: {probe_name}.grpc.port {port} is not a containerPort"
                        )
                for kind in ("httpGet", "tcpSocket"):
                    if kind in probe:
                        port = (probe[kind] or {}).get("port")
                        if isinstance(port, str) and port not in port_names:
                            errors.append(
                                f"{cwhere}: {probe_name}.{kind}.port {port!r} is not a named port"
                            )
                        if isinstance(port, int) and port not in port_numbers:
                            errors.append(
                                f"{cwhere}: {probe_name}.{kind}.port {port} is not a containerPort"
                            )
            config_env = {k: v for ref in c.get("envFrom") or [] if "configMapRef" in ref
                          for k, v in configmap_data(ref["configMapRef"].get("name")).items()}
            config_env.update({k: v for ref in c.get("envFrom") or [] if "secretRef" in ref
                               for k, v in secret_data(ref["secretRef"].get("name")).items()})
            module = next((a.split(".", 1)[1] for a in c.get("args") or []
                           if a.startswith("services.")), None)
            if module:
                deployed.append((cwhere, module, {
                    **config_env, **{e.get("name"): e.get("value") for e in c.get("env") or []}}))
            errors += _k8s_credentials(cwhere, c, volumes, config_env,
                                       lambda n, k: secret_data(n).get(k))
            errors += _k8s_nats_tls(cwhere, c, volumes, configmap_data)
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    errors.append(f"{cwhere}: volumeMount {m.get('name')!r} has no volume")
            for ref in c.get("envFrom") or []:
                if "configMapRef" in ref:
                    n = ref["configMapRef"].get("name")
                    if configmap_keys(n) is None and not ref["configMapRef"].get("optional"):
                        errors.append(f"{cwhere}: envFrom ConfigMap {n!r} is not defined")
                if "secretRef" in ref:
                    n = ref["secretRef"].get("name")
                    if secret_keys(n) is None and not ref["secretRef"].get("optional"):
                        errors.append(f"{cwhere}: envFrom Secret {n!r} is not defined")
            env_names = []
            for env in c.get("env") or []:
                env_names.append(env.get("name"))
                vf = env.get("valueFrom") or {}
                for ref_kind, lookup in (
                    ("secretKeyRef", secret_keys),
                    ("configMapKeyRef", configmap_keys),
                ):
                    ref = vf.get(ref_kind)
                    if not ref or ref.get("optional"):
                        continue
                    keys = lookup(ref.get("name"))
                    if keys is None:
                        errors.append(
                            f"{cwhere}: env {env.get('name')}: {ref_kind} {ref.get('name')!r} is not defined"
                        )
                    elif ref.get("key") not in keys:
                        errors.append(
                            f"{cwhere}: env {env.get('name')}: key {ref.get('key')!r} not in {ref.get('name')!r}"
                        )
            dup = {n for n in env_names if env_names.count(n) > 1}
            if dup:
                errors.append(f"{cwhere}: env set twice: {sorted(dup)}")

    for path, svc in ((p, o) for p, o in objects if o["kind"] == "Service"):
        where = f"{path.name}: Service/{svc['metadata']['name']}"
        selector = (svc.get("spec") or {}).get("selector") or {}
        if not selector:
            continue  # selector-less Service (manual Endpoints)
        targets = [
            o
            for _, o in workloads
            if all(
                (((o.get("spec") or {}).get("template") or {}).get("metadata") or {})
                .get("labels", {})
                .get(k)
                == v
                for k, v in selector.items()
            )
        ]
        if not targets:
            errors.append(f"{where}: selector {selector} matches no workload defined here")
            continue
        names, numbers = set(), set()
        for o in targets:
            for c in _pod_spec(o).get("containers") or []:
                for p in c.get("ports") or []:
                    names.add(p.get("name"))
                    numbers.add(p.get("containerPort"))
        for p in (svc.get("spec") or {}).get("ports") or []:
            tp = p.get("targetPort", p.get("port"))
            if isinstance(tp, str) and tp not in names:
                errors.append(f"{where}: targetPort {tp!r} is not a named container port")
            if isinstance(tp, int) and tp not in numbers:
                errors.append(f"{where}: targetPort {tp} is not a container port")
    errors += _deployed_and_reachable("k8s", deployed)
    for module, port in _grpc_ports(deployed).items():
        svc = by_kind.get("Service", {}).get(module)
        if svc is None or port not in {p.get("port") for p in (svc.get("spec") or {}).get(
                "ports") or []}:
            errors.append(f"k8s: no Service {module!r} with port {port} "
                          f"(LLMSTUDIO_{module.upper()}_ADDR)")
    return errors


# ----------------------------------------------------------------------------- OTel collector
def check_otel(path: Path) -> list[str]:
    errors: list[str] = []
    docs = load_documents(path, errors)
    if errors:
        return errors
    if len(docs) != 1:
        return [f"{path}: expected one YAML document"]
    cfg = docs[0]
    service = cfg.get("service") or {}
    for ext in service.get("extensions") or []:
        if ext not in (cfg.get("extensions") or {}):
            errors.append(f"{path}: service.extensions: {ext!r} is not defined")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        errors.append(f"{path}: no service.pipelines")
    for pname, pipe in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            defined = cfg.get(section) or {}
            for comp in (pipe or {}).get(section) or []:
                if comp not in defined:
                    errors.append(
                        f"{path}: pipeline {pname}: {section[:-1]} {comp!r} is not defined"
                    )
        if not (pipe or {}).get("receivers") or not (pipe or {}).get("exporters"):
            errors.append(f"{path}: pipeline {pname} needs receivers and exporters")
    return errors


# ----------------------------------------------------------------------------- compose
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*\S+(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE)


def dockerfile_stages(path: Path) -> list[str]:
    stages = []
    for line in path.read_text().splitlines():
        m = _FROM.match(line)
        if m and m.group(1):
            stages.append(m.group(1))
    return stages


# What every LLM Studio service needs to join the authenticated, signed bus over TLS
# (llmstudio.natsauth, llmstudio.signing, llmstudio.tls): its own NATS user, and as secrets under
# /run/secrets: env var -> (file, its secret: shared (None) or the service's own, <service><suffix>
# in k8s, a compose secret named "...-<service>").
CREDENTIAL_FILES: dict[str, tuple[str, str | None]] = {
    "LLMSTUDIO_NATS_PASSWORD_FILE": ("nats-password", ".password"),
    "LLMSTUDIO_SIGNING_KEY_FILE": ("signing-key", ".key"),
    "LLMSTUDIO_TRUSTED_SIGNERS_FILE": ("signers.json", None),
    "LLMSTUDIO_TLS_CA_FILE": ("ca.crt", None),
}
# ... and one with a gRPC API (LLMSTUDIO_GRPC_PORT) serves TLS only, with its own certificate.
TLS_SERVER_FILES: dict[str, tuple[str, str]] = {
    "LLMSTUDIO_TLS_CERT_FILE": ("tls.crt", ".crt"),
    "LLMSTUDIO_TLS_KEY_FILE": ("tls.key", ".key"),
}


# Least privilege in the stores (libs/llmstudio/credentials.py): env var -> (the file under
# /run/secrets, the k8s Secret and its key <service><suffix>, the compose secret's prefix).
DATABASE_PASSWORD = ("LLMSTUDIO_DATABASE_PASSWORD_FILE", "database-password",
                     "llmstudio-postgres", ".password", "database-password-")
S3_SECRET_KEY = ("LLMSTUDIO_S3_SECRET_KEY_FILE", "s3-secret-key", "llmstudio-s3", ".secret",
                 "s3-secret-key-")
S3_CREDENTIALS = ("LLMSTUDIO_S3_ACCESS_KEY", "LLMSTUDIO_S3_SECRET_KEY",
                  "LLMSTUDIO_S3_SECRET_KEY_FILE")
# what only the stores themselves and their one-shot init jobs may have
ROOT_ENV = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
            "POSTGRES_PASSWORD", "PGPASSWORD")


def store_users(root: Path = ROOT) -> set[str]:
    """The services that use the artifact store: those whose app.py calls artifact_store()."""
    return {p.parent.name for p in (root / "services").glob("*/app.py")
            if "artifact_store()" in p.read_text()}


def _least_privilege(where: str, module: str, env: dict, mounted: dict, flavour: str,
                     roots: dict | None = None) -> list[str]:
    """`module`'s own PostgreSQL role and database, and its own MinIO user or none.
    `mounted`: file under /run/secrets -> (k8s Secret or compose secret, key or None).
    `roots`: the stores' root credentials (compose: MINIO_ROOT_USER, POSTGRES_USER, ...)."""
    roots = roots or {}
    errors = []
    role, own_key = f"llmstudio_{module}", f"llmstudio-{module}"
    for var in ROOT_ENV:
        if var in env:
            errors.append(f"{where}: {var} is the stores' root credential: only MinIO, "
                          "PostgreSQL and their init jobs may have it")
    url = env.get("LLMSTUDIO_DATABASE_URL") or ""
    parts = urlsplit(url)
    if not url:
        errors.append(f"{where}: no LLMSTUDIO_DATABASE_URL")
    elif parts.username in (roots.get("POSTGRES_USER"), "postgres"):
        errors.append(f"{where}: LLMSTUDIO_DATABASE_URL connects as the PostgreSQL superuser "
                      f"{parts.username!r}, not its own role {role!r}")
    elif parts.username != role:
        errors.append(f"{where}: LLMSTUDIO_DATABASE_URL must connect as its own role {role!r}, "
                      f"not {parts.username!r}")
    if url and parts.path.lstrip("/") != role:
        errors.append(f"{where}: LLMSTUDIO_DATABASE_URL must name its own database {role!r}")
    if parts.password:
        errors.append(f"{where}: LLMSTUDIO_DATABASE_URL has a password: its own comes from "
                      "LLMSTUDIO_DATABASE_PASSWORD_FILE")
    files = [DATABASE_PASSWORD]
    uses_store = module in store_users()
    if uses_store:
        files.append(S3_SECRET_KEY)
        access_key = env.get("LLMSTUDIO_S3_ACCESS_KEY")
        if access_key is not None and access_key == roots.get("MINIO_ROOT_USER"):
            errors.append(f"{where}: LLMSTUDIO_S3_ACCESS_KEY is the MinIO root user, not its own "
                          f"{own_key!r}")
        elif access_key != own_key:
            errors.append(f"{where}: LLMSTUDIO_S3_ACCESS_KEY must be its own MinIO user "
                          f"{own_key!r}, not {access_key!r}")
        if "LLMSTUDIO_S3_SECRET_KEY" in env:
            root = env["LLMSTUDIO_S3_SECRET_KEY"] == roots.get("MINIO_ROOT_PASSWORD")
            errors.append(f"{where}: LLMSTUDIO_S3_SECRET_KEY is set"
                          f"{' to the MinIO root password' if root else ''}: its own secret key "
                          "comes from LLMSTUDIO_S3_SECRET_KEY_FILE")
    else:
        given = [v for v in S3_CREDENTIALS if v in env] + \
            [f"/run/secrets/{S3_SECRET_KEY[1]}" for _ in [0] if S3_SECRET_KEY[1] in mounted]
        if given:
            errors.append(f"{where}: {module} does not use the artifact store and gets no S3 "
                          f"credentials, but has {', '.join(given)}")
    for var, target, k8s_secret, suffix, compose_prefix in files:
        if env.get(var) != f"/run/secrets/{target}":
            errors.append(f"{where}: {var} must be /run/secrets/{target}")
        source, key = mounted.get(target, (None, None))
        if flavour == "k8s":
            want = (k8s_secret, f"{module}{suffix}")
            if (source, key) != want:
                errors.append(f"{where}: /run/secrets/{target} must be the key {want[1]!r} of "
                              f"Secret {want[0]!r}, not {key!r} of {source!r}")
        elif source is None:
            errors.append(f"{where}: no secret mounted as {target}")
        elif source != f"{compose_prefix}{module}":
            errors.append(f"{where}: secret {target} comes from {source}, not "
                          f"{compose_prefix}{module} ({module}'s own)")
    return errors


def _compose_stores(services: dict, secrets: dict) -> list[str]:
    """minio-init creates a MinIO user per store-using service from its secret, with a policy
    file that confines it to the bucket; postgres-init a role per service."""
    errors = []
    modules = {m for svc in services.values() for m in [_module(svc)] if m}
    users = store_users()

    def mounted(target: str) -> list[tuple[str, dict]]:
        return [(n, s) for n, s in services.items()
                if any(x.get("target") == target for x in s.get("secrets") or [])]

    for module in sorted(modules):
        for prefix, target, what in (("database-password-", f"{module}.password",
                                      "postgres-init (its PostgreSQL role)"),
                                     ("s3-secret-key-", f"{module}.secret",
                                      "minio-init (its MinIO user)")):
            if prefix.startswith("s3") and module not in users:
                continue
            holders = [n for n, s in mounted(target)
                       if any(x.get("target") == target and x.get("source") == prefix + module
                              for x in s.get("secrets") or [])]
            if not holders:
                errors.append(f"compose: no service is given {prefix}{module} as {target}: "
                              f"{what} cannot be made")
    for name, svc in services.items():
        env = svc.get("environment") or {}
        policies = env.get("LLMSTUDIO_S3_POLICIES_DIR")
        if not policies:
            continue
        mounts = {v.get("target"): v.get("source") for v in svc.get("volumes") or []}
        if policies not in mounts:
            errors.append(f"compose: {name}: LLMSTUDIO_S3_POLICIES_DIR {policies} is not mounted")
            continue
        bucket = env.get("LLMSTUDIO_S3_BUCKET", "llmstudio")
        for module in sorted(users & modules):
            path = Path(mounts[policies]) / f"{module}.json"
            if not path.is_file():
                errors.append(f"compose: {name}: no MinIO policy {path} for {module}")
                continue
            errors += [f"compose: {name}: {path}: {e}" for e in _policy_problems(
                json.loads(path.read_text()), bucket)]
    return errors


def _policy_problems(policy: dict, bucket: str) -> list[str]:
    """An allow of a wildcard action, or of a resource outside `bucket` (but read-only
    import buckets), or a listing without a prefix condition."""
    problems = []
    for st in policy.get("Statement") or []:
        if st.get("Effect") != "Allow":
            continue
        actions = st.get("Action") or []
        actions = [actions] if isinstance(actions, str) else actions
        resources = st.get("Resource") or []
        resources = [resources] if isinstance(resources, str) else resources
        if any("*" in a or a.startswith("admin:") for a in actions):
            problems.append(f"{st.get('Sid')}: wildcard or admin action {actions}")
        own = [r for r in resources if r == f"arn:aws:s3:::{bucket}"
               or r.startswith(f"arn:aws:s3:::{bucket}/")]
        if set(resources) - set(own) and set(actions) != {"s3:GetObject"}:
            problems.append(f"{st.get('Sid')}: {actions} outside bucket {bucket!r}")
        if any(r in ("*", "arn:aws:s3:::*", f"arn:aws:s3:::{bucket}/*") for r in resources):
            problems.append(f"{st.get('Sid')}: the whole bucket or store {resources}")
        if "s3:ListBucket" in actions and "s3:prefix" not in json.dumps(st.get("Condition")):
            problems.append(f"{st.get('Sid')}: s3:ListBucket without an s3:prefix condition")
    return problems


def _module(svc: dict) -> str | None:
    return next((c.split(".", 1)[1] for c in svc.get("command") or []
                 if c.startswith("services.")), None)


def _compose_credentials(name: str, svc: dict, secrets: dict,
                         roots: dict | None = None) -> list[str]:
    command = svc.get("command") or []
    module = next((c.split(".", 1)[1] for c in command if c.startswith("services.")), None)
    if module is None:
        return []
    env = svc.get("environment") or {}
    errors = []
    if env.get("LLMSTUDIO_NATS_USER") != module:
        errors.append(f"compose: {name}: LLMSTUDIO_NATS_USER must be its own user {module!r}, "
                      f"not {env.get('LLMSTUDIO_NATS_USER')!r}")
    mounted = {s.get("target"): s.get("source") for s in svc.get("secrets") or []}
    serves_grpc = "LLMSTUDIO_GRPC_PORT" in env
    for var, (target, key) in _secret_files(module, serves_grpc).items():
        if env.get(var) != f"/run/secrets/{target}":
            errors.append(f"compose: {name}: {var} must be /run/secrets/{target}")
        source = mounted.get(target)
        if source is None:
            errors.append(f"compose: {name}: no secret mounted as {target}")
            continue
        if key != target and not source.endswith(f"-{module}"):
            errors.append(f"compose: {name}: secret {target} comes from {source}, "
                          f"not {module}'s own")
        file = (secrets.get(source) or {}).get("file", "")
        if not file or not Path(file).is_file():
            errors.append(f"compose: {name}: secret {source}: file {file or '?'} does not exist "
                          "(run `llmstudio credentials` and `llmstudio certs`)")
    errors += _least_privilege(f"compose: {name}", module, env,
                               {t: (s, None) for t, s in mounted.items()}, "compose", roots)
    for target in (DATABASE_PASSWORD[1], S3_SECRET_KEY[1]):
        file = (secrets.get(mounted.get(target)) or {}).get("file", "")
        if target in mounted and not Path(file).is_file():
            errors.append(f"compose: {name}: secret {mounted[target]}: file {file or '?'} does "
                          "not exist (run `llmstudio credentials`)")
    if serves_grpc and "insecure_channel" in " ".join((svc.get("healthcheck") or {}).get("test")
                                                      or []):
        errors.append(f"compose: {name}: its healthcheck speaks plaintext to a TLS-only port")
    return errors


def _compose_nats_tls(name: str, svc: dict) -> list[str]:
    """nats-server's config has a tls block, and the files it names are mounted."""
    command = svc.get("command") or []
    if "nats-server" not in command or "--config" not in command:
        return []
    config = command[command.index("--config") + 1]
    mounts = {v.get("target"): v.get("source") for v in svc.get("volumes") or []}
    if config not in mounts:
        return [f"compose: {name}: its config {config} is not mounted"]
    files = _nats_tls_files(Path(mounts[config]).read_text()) \
        if Path(mounts[config]).is_file() else []
    if not files:
        return [f"compose: {name}: {config} has no tls block with cert_file and key_file "
                "(TLS only)"]
    return [f"compose: {name}: {config}'s tls file {f} is not mounted" for f in files
            if f not in mounts]


def check_compose(model: dict) -> list[str]:
    errors: list[str] = []
    services = model.get("services") or {}
    roots = {k: v for svc in services.values() for k, v in (svc.get("environment") or {}).items()
             if k in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "POSTGRES_USER",
                      "POSTGRES_PASSWORD") and _module(svc) is None and "PGHOST" not in
             (svc.get("environment") or {})}
    errors += _compose_stores(services, model.get("secrets") or {})
    errors += _deployed_and_reachable("compose", [
        (f"compose: {name}", module, svc.get("environment") or {})
        for name, svc in services.items() for module in [_module(svc)] if module])
    for module in sorted(_grpc_ports([("", m, s.get("environment") or {})
                                      for s in services.values() for m in [_module(s)] if m])):
        if module not in services:  # the compose DNS name the others reach it by
            errors.append(f"compose: no service named {module!r} (LLMSTUDIO_"
                          f"{module.upper()}_ADDR points there)")
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = Path(build.get("context", "."))
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not context.is_dir():
                errors.append(f"compose: {name}: build context {context} does not exist")
            elif not dockerfile.is_file():
                errors.append(f"compose: {name}: Dockerfile {dockerfile} does not exist")
            elif build.get("target") and build["target"] not in dockerfile_stages(dockerfile):
                errors.append(
                    f"compose: {name}: build target {build['target']!r} is not a stage of {dockerfile}"
                )
        for vol in svc.get("volumes") or []:
            if vol.get("type") == "bind" and not Path(vol.get("source", "")).exists():
                errors.append(
                    f"compose: {name}: bind-mount source {vol.get('source')} does not exist"
                )
        errors += _compose_credentials(name, svc, model.get("secrets") or {}, roots)
        errors += _compose_nats_tls(name, svc)
        for dep, cond in (svc.get("depends_on") or {}).items():
            if (cond or {}).get("condition") == "service_healthy":
                hc = (services.get(dep) or {}).get("healthcheck") or {}
                if not hc.get("test") or hc.get("disable"):
                    errors.append(
                        f"compose: {name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                    )
    return errors


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--k8s", type=Path, default=None, help="default: ROOT/deploy/k8s")
    ap.add_argument(
        "--otel", type=Path, default=None, help="default: ROOT/deploy/otel/collector.yaml"
    )
    ap.add_argument("--compose-json", type=Path, default=None)
    args = ap.parse_args(argv)

    k8s_dir = args.k8s or args.root / "deploy" / "k8s"
    otel = args.otel or args.root / "deploy" / "otel" / "collector.yaml"
    errors = check_k8s(k8s_dir) + check_otel(otel)
    if args.compose_json:
        errors += check_compose(json.loads(args.compose_json.read_text()))
    for e in errors:
        print(f"check_manifests: {e}", file=sys.stderr)
    if errors:
        return 1
    print(
        f"check_manifests: OK ({k8s_dir}, {otel}{', compose model' if args.compose_json else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
