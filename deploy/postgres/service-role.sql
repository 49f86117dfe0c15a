-- One LLM Studio service's own PostgreSQL role and database (least privilege, DESIGN.md §4).
--
--   psql -v role=llmstudio_dataset -v db=llmstudio_dataset \
--        -v password_file=deploy/secrets/postgres/dataset.password -f service-role.sql
--
-- deploy/postgres/init.sh runs it for every service, as a superuser (or a role with CREATEROLE
-- and CREATEDB, as on a managed server). Idempotent: run again, it changes nothing but the
-- password (set from the file each time) and hands over what another role created in the
-- database (e.g. the shared `llmstudio` superuser before services had roles of their own).
--
-- - role :role: LOGIN, and nothing more (no SUPERUSER, CREATEDB, CREATEROLE, BYPASSRLS);
-- - database :db, owned by :role; nobody else may connect (REVOKE ALL ... FROM PUBLIC: the
--   other services' roles are refused), and :role owns its `public` schema.
\set ON_ERROR_STOP on
\set password `cat :'password_file'`

SELECT format('CREATE ROLE %I LOGIN', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOCREATEDB NOCREATEROLE PASSWORD %L', :'role', :'password')
\gexec
\unset password
-- a role that was made with more (by hand) is refused rather than used
SELECT format('DO $check$ BEGIN RAISE EXCEPTION %L; END $check$',
              format('role %s is a superuser or may bypass RLS or replicate: not a service role',
                     :'role'))
FROM pg_roles WHERE rolname = :'role' AND (rolsuper OR rolbypassrls OR rolreplication)
\gexec

SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db')
\gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'role')
\gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db')
\gexec

\connect :"db"
SELECT format('ALTER SCHEMA public OWNER TO %I', :'role')
\gexec
REVOKE ALL ON SCHEMA public FROM PUBLIC;
-- what another role created here (tables, views, sequences not owned by a table, types)
SELECT format('ALTER %s %I.%I OWNER TO %I',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                             WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
              n.nspname, c.relname, :'role')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role')
  AND NOT c.relispartition
  AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                       AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
\gexec
SELECT format('ALTER TYPE %I.%I OWNER TO %I', n.nspname, t.typname, :'role')
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'r')
  AND t.typowner <> (SELECT oid FROM pg_roles WHERE rolname = :'role')
\gexec
