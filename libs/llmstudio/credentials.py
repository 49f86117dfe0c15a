"""A deployment's secrets, made in one place for the embedded stack, compose and k8s: the NATS
users' passwords and nats-server's authorization file (llmstudio.natsauth), a signing key per
service with the trust file of their public keys (llmstudio.signing), and each service's own
least-privilege artifact-store and database credentials:

- `s3/<service>.secret`: the secret key of its MinIO user `llmstudio-<service>` (only the
  services that use the artifact store: not the scheduler), and `s3/policies/<service>.json`,
  the MinIO policy that user gets (`STORE_ACCESS`: deny by default, only its own prefixes);
- `postgres/<service>.password`: the password of its PostgreSQL role `llmstudio_<service>`,
  which owns its database `llmstudio_<service>` and nothing else.

deploy/minio/init.sh and deploy/postgres/init.sh create the users, policies and roles from these
files (compose runs them as its minio-init and postgres-init services)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from .events.emitters import ANY_SERVICE
from .natsauth import write_server_config
from .secretfiles import secret_file
from .signing import ensure_keys

# What each service may do in the artifact store, by key prefix (MinIO/S3 wildcards: `*` is any
# run of characters). Keys: libs/llmstudio/storage.py (`tenant_key`) and governance's anchor.
#   read: GetObject (and listing); write: PutObject too; delete: DeleteObject too.
# The scheduler never touches the store: it gets no S3 user at all.
DATASETS, JOBS, EVALUATIONS = "tenants/*/datasets/", "tenants/*/jobs/", "tenants/*/evaluations/"
AUDIT = "audit/"
STORE_ACCESS: dict[str, dict[str, tuple[str, ...]]] = {
    "dataset": {"write": (DATASETS,)},
    "trainer": {"read": (DATASETS,), "write": (JOBS,), "delete": (JOBS,)},
    "evaluator": {"read": (DATASETS, JOBS), "write": (EVALUATIONS,)},
    "registry": {"read": (DATASETS, JOBS, EVALUATIONS)},
    "serving": {"read": (JOBS,)},  # the checkpoints it serves
    # append-only anchor of the audit chain: put, get, list; deleting is explicitly denied
    "governance": {"write": (AUDIT,), "deny_delete": (AUDIT,)},
}
STORE_USERS = tuple(sorted(STORE_ACCESS))
DEFAULT_BUCKET = "llmstudio"


def s3_access_key(service: str) -> str:
    """The MinIO user (access key) of `service`."""
    return f"llmstudio-{service}"


def db_role(service: str) -> str:
    """The PostgreSQL role of `service`, owner of its database of the same name."""
    return f"llmstudio_{service}"


def store_policy(service: str, bucket: str = DEFAULT_BUCKET,
                 import_buckets: tuple[str, ...] | list[str] = ()) -> dict:
    """The MinIO (IAM) policy of `service`'s user: only the actions and prefixes of
    `STORE_ACCESS`; listing only under those prefixes (s3:ListBucket with an s3:prefix
    condition). The dataset service may also read the operator's import buckets (objects only,
    it lists nothing there)."""
    access = STORE_ACCESS[service]
    arn = f"arn:aws:s3:::{bucket}"
    reads = sorted({*access.get("read", ()), *access.get("write", ()), *access.get("delete", ())})
    statements: list[dict] = [
        {"Sid": "ListOwnPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [arn], "Condition": {"StringLike": {"s3:prefix": [f"{p}*" for p in reads]}}},
        {"Sid": "Read", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [f"{arn}/{p}*" for p in reads]},
    ]
    if access.get("write"):
        statements.append(
            {"Sid": "Write", "Effect": "Allow",
             "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
             "Resource": [f"{arn}/{p}*" for p in access["write"]]})
    if access.get("delete"):
        statements.append({"Sid": "Delete", "Effect": "Allow", "Action": ["s3:DeleteObject"],
                           "Resource": [f"{arn}/{p}*" for p in access["delete"]]})
    if access.get("deny_delete"):
        statements.append({"Sid": "AppendOnly", "Effect": "Deny", "Action": ["s3:DeleteObject"],
                           "Resource": [f"{arn}/{p}*" for p in access["deny_delete"]]})
    if service == "dataset" and import_buckets:
        statements.append({"Sid": "ReadImportBuckets", "Effect": "Allow",
                           "Action": ["s3:GetObject"],
                           "Resource": [f"arn:aws:s3:::{b}/*" for b in sorted(import_buckets)]})
    return {"Version": "2012-10-17", "Statement": statements}


def _token() -> str:
    return secrets.token_urlsafe(32)


def _write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (not secret: a policy), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return
    staged = path.with_suffix(path.suffix + ".tmp")
    staged.write_text(text)
    os.replace(staged, path)


def write_store_credentials(directory: Path, bucket: str = DEFAULT_BUCKET,
                            import_buckets: tuple[str, ...] | list[str] = ()) -> Path:
    """`directory`/<service>.secret (made once, owner-only) and `directory`/policies/
    <service>.json (rewritten each time: the bucket or the import buckets may change)."""
    for service in STORE_USERS:
        secret_file(directory / f"{service}.secret", _token)
        _write_text(directory / "policies" / f"{service}.json",
                    json.dumps(store_policy(service, bucket, import_buckets), indent=2) + "\n")
    return directory


def write_database_credentials(directory: Path) -> Path:
    """`directory`/<service>.password for every service (made once, owner-only)."""
    for service in sorted(ANY_SERVICE):
        secret_file(directory / f"{service}.password", _token)
    return directory


def write_credentials(directory: Path, *, bucket: str | None = None,
                      import_buckets: list[str] | None = None) -> dict[str, Path]:
    """`directory`/nats-auth, keys, s3 and postgres; what exists already is kept (a password or
    a key is made once), so running it again changes nothing a deployment relies on. The
    bucket and the dataset service's import buckets default to the settings
    (LLMSTUDIO_S3_BUCKET, LLMSTUDIO_DATASET_IMPORT_BUCKETS)."""
    if bucket is None:  # as the services read them (llmstudio.config), without the rest
        bucket = os.environ.get("LLMSTUDIO_S3_BUCKET") or DEFAULT_BUCKET
    if import_buckets is None:
        import_buckets = [b.strip() for b in
                          os.environ.get("LLMSTUDIO_DATASET_IMPORT_BUCKETS", "").split(",")
                          if b.strip()]
    return {
        "nats_auth": write_server_config(directory / "nats-auth").parent,
        "keys": ensure_keys(directory / "keys", ANY_SERVICE).parent,
        "s3": write_store_credentials(directory / "s3", bucket, import_buckets),
        "postgres": write_database_credentials(directory / "postgres"),
    }
