#!/bin/sh
# A PostgreSQL role and database per LLM Studio service (deploy/postgres/service-role.sql): role
# llmstudio_<service>, LOGIN only, owning database llmstudio_<service> and nothing else, with the
# password `llmstudio credentials` made for it (<service>.password). Idempotent: compose runs it
# on every `up` (service postgres-init); against an external server (k8s):
#
#   PGHOST=DB_HOST PGUSER=ADMIN PGPASSWORD=... LLMSTUDIO_PG_PASSWORDS_DIR=deploy/secrets/postgres \
#     sh deploy/postgres/init.sh
#
# Environment: the libpq PG* variables (who runs it: a superuser or a CREATEROLE + CREATEDB
# role; PGDATABASE default postgres), LLMSTUDIO_PG_PASSWORDS_DIR (default /run/secrets: the
# <service>.password files).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
dir=${LLMSTUDIO_PG_PASSWORDS_DIR:-/run/secrets}
made=0
for file in "$dir"/*.password; do
    [ -f "$file" ] || continue
    service=$(basename "$file" .password)
    psql -X -q -v ON_ERROR_STOP=1 -d "${PGDATABASE:-postgres}" \
        -v role="llmstudio_$service" -v db="llmstudio_$service" -v password_file="$file" \
        -f "$here/service-role.sql"
    echo "postgres-init: role llmstudio_$service owns database llmstudio_$service"
    made=$((made + 1))
done
if [ "$made" -eq 0 ]; then
    echo "postgres-init: no <service>.password in $dir (run \`llmstudio credentials\`)" >&2
    exit 1
fi
