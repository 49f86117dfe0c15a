#!/bin/sh
# The artifact bucket, and a MinIO user per LLM Studio service that uses the store, with its own
# policy: user llmstudio-<service>, the secret key `llmstudio credentials` made for it
# (<service>.secret), the policy it wrote (policies/<service>.json: deny by default, only the
# service's prefixes; see libs/llmstudio/credentials.py). Idempotent: compose runs it on every
# `up` (service minio-init; a secret key or a policy that changed is updated); against an
# external MinIO (k8s), from a workstation with `mc`:
#
#   MINIO_URL=https://minio.example.com MINIO_ROOT_USER=... MINIO_ROOT_PASSWORD=... \
#   LLMSTUDIO_S3_SECRETS_DIR=deploy/secrets/s3 \
#   LLMSTUDIO_S3_POLICIES_DIR=deploy/secrets/s3/policies sh deploy/minio/init.sh
#
# Environment: MINIO_URL (default http://minio:9000), MINIO_ROOT_USER, MINIO_ROOT_PASSWORD,
# LLMSTUDIO_S3_BUCKET (default llmstudio), LLMSTUDIO_S3_SECRETS_DIR (default /run/secrets),
# LLMSTUDIO_S3_POLICIES_DIR (default /etc/llmstudio/minio-policies).
set -eu

secrets=${LLMSTUDIO_S3_SECRETS_DIR:-/run/secrets}
policies=${LLMSTUDIO_S3_POLICIES_DIR:-/etc/llmstudio/minio-policies}
bucket=${LLMSTUDIO_S3_BUCKET:-llmstudio}
config=$(mktemp -d)  # mc's alias (with the root credentials) never outlives this script
trap 'rm -rf "$config"' EXIT
mc() { command mc --config-dir "$config" "$@"; }

mc alias set llmstudio "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" \
    "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "llmstudio/$bucket"
made=0
for policy in "$policies"/*.json; do
    [ -f "$policy" ] || continue
    service=$(basename "$policy" .json)
    user="llmstudio-$service"
    mc admin user add llmstudio "$user" "$(cat "$secrets/$service.secret")" >/dev/null
    mc admin policy create llmstudio "$user" "$policy" >/dev/null
    if ! out=$(mc admin policy attach llmstudio "$user" --user "$user" 2>&1); then
        case "$out" in
            *"already"*) ;;  # attached on an earlier run
            *) echo "$out" >&2; exit 1 ;;
        esac
    fi
    echo "minio-init: user $user with policy $user"
    made=$((made + 1))
done
if [ "$made" -eq 0 ]; then
    echo "minio-init: no policies in $policies (run \`llmstudio credentials\`)" >&2
    exit 1
fi
