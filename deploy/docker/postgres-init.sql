-- One database per LLM Studio service (each service owns its store; see DESIGN.md §4).
--
-- docker-compose mounts this file into /docker-entrypoint-initdb.d/, so the postgres image runs
-- it once, as POSTGRES_USER, when the data directory is first created. It is idempotent and can
-- be re-run by hand against an existing or external server (e.g. the one the k8s manifests use):
--   psql "postgresql://<admin>@<host>:5432/postgres" -f deploy/docker/postgres-init.sql
-- The databases are owned by whoever runs it; grant them to a dedicated role if you use one.

SELECT format('CREATE DATABASE %I', db)
FROM unnest(ARRAY[
    'llmstudio_dataset',
    'llmstudio_scheduler',
    'llmstudio_trainer',
    'llmstudio_evaluator',
    'llmstudio_registry',
    'llmstudio_governance'
]) AS db
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = db)
\gexec
