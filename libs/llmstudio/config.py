"""Settings for every service, the CLI and the SDK.

Read from `LLMSTUDIO_*` environment variables (pydantic-settings); defaults point at a local,
single-machine setup under `.llmstudio/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Default gRPC ports of the services; the embedded stack picks free ports instead.
DEFAULT_PORTS = {
    "dataset": 50051,
    "scheduler": 50052,
    "registry": 50053,
    "evaluator": 50054,
    "governance": 50055,
    "serving": 50056,
}
GRPC_SERVICES = tuple(DEFAULT_PORTS)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMSTUDIO_", extra="ignore")

    data_dir: Path = Path(".llmstudio")
    nats_url: str = "nats://127.0.0.1:4222"
    # who this process is on NATS (llmstudio.natsauth); unset: no authentication
    nats_user: str = ""
    nats_password_file: Path | None = None
    # TLS outside the embedded stack (llmstudio.tls, `llmstudio certs`): this service's gRPC
    # server certificate and key, and the CA that clients and services trust on gRPC and NATS
    # (set: NATS is spoken over TLS only). Unset: plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    # Artifact store: "file" (under data_dir/artifacts) or "s3".
    artifact_store: str = "file"
    artifact_root: Path | None = None
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    # the secret key in a file instead (compose and k8s: the service's own, /run/secrets);
    # read at start and overrides s3_secret_key
    s3_secret_key_file: Path | None = None
    s3_bucket: str = "llmstudio"
    s3_secure: bool = False
    s3_region: str | None = None

    # Metadata: one database per service. Empty -> sqlite under data_dir.
    database_url: str = ""
    # the password of database_url's user in a file (compose and k8s: the service's own role's,
    # /run/secrets); it goes into the URL's password part, quoted, replacing any there
    database_password_file: Path | None = None

    # gRPC: the port this service listens on (0 = its default), and where clients find each one.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    dataset_addr: str = f"127.0.0.1:{DEFAULT_PORTS['dataset']}"
    scheduler_addr: str = f"127.0.0.1:{DEFAULT_PORTS['scheduler']}"
    registry_addr: str = f"127.0.0.1:{DEFAULT_PORTS['registry']}"
    evaluator_addr: str = f"127.0.0.1:{DEFAULT_PORTS['evaluator']}"
    governance_addr: str = f"127.0.0.1:{DEFAULT_PORTS['governance']}"
    serving_addr: str = f"127.0.0.1:{DEFAULT_PORTS['serving']}"

    # Identity: the key a client sends; the admin key governance creates on first start.
    api_key: str = ""
    bootstrap_admin_key: str = ""

    # Signed events (llmstudio.signing): this service's ed25519 key, and the public keys of the
    # services whose events it accepts (unset: it checks nothing, as a lone service under test)
    signing_key_file: Path | None = None
    trusted_signers_file: Path | None = None

    # Telemetry: "none", "console", "file:<path>" (JSON lines) or "otlp" (needs the exporter).
    otel_exporter: str = "none"
    otel_endpoint: str = "http://127.0.0.1:4317"

    # Trainer-worker
    worker_id: str = ""
    heartbeat_interval_s: float = 2.0
    worker_ttl_s: float = 10.0
    # Training processes a worker runs for one job (distributed.num_processes): 0 = one per GPU,
    # or on a CPU worker one per core
    worker_slots: int = 0
    # Scheduler: a waiting job rises one priority class per this many seconds (never to urgent)
    priority_aging_s: float = 900.0
    # Scheduler replicas: the placement leader's lease (a dead leader is replaced within it)
    scheduler_lease_ttl_s: float = 5.0
    replica_id: str = ""  # this replica's name in the lease (default: <host>-<pid>-<random>)

    # Where a job's base_model may be (comma-separated folders; llmstudio.modelroots). Empty:
    # any local folder or hub id. The embedded stack sets <data dir>/models.
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # Dataset service: upload limits, and where ImportDataset may read from. Lists are
    # comma-separated in the environment (LLMSTUDIO_DATASET_IMPORT_BUCKETS=raw,curated).
    dataset_max_upload_bytes: int = 64 << 30
    dataset_max_expanded_bytes: int = 64 << 30  # what a compressed upload may expand to
    dataset_max_line_bytes: int = 16 << 20  # one JSONL line / record
    dataset_near_duplicate_max_rows: int = 1_000_000  # MinHash scan limit (0 = off)
    dataset_import_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    dataset_import_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    dataset_work_dir: Path | None = None  # spool for uploads (default data_dir/spool)
    dataset_max_concurrent_ingests: int = 2  # more get RESOURCE_EXHAUSTED
    # per tenant: uploads being received at once, and the bytes they may hold in the spool
    dataset_max_uploads_per_tenant: int = 2
    dataset_tenant_spool_bytes: int = 64 << 30
    # Serving: the OpenAI-compatible HTTP API's port (on grpc_host; 0: none), where a client
    # finds it, and the generation engines' limits (per loaded base model)
    serving_http_port: int = 8000
    serving_http_url: str = "http://127.0.0.1:8000"
    serving_max_batch_size: int = 8
    serving_max_queue: int = 64  # waiting requests per model; more get 429 / RESOURCE_EXHAUSTED
    serving_adapter_memory_mb: int = 512  # LoRA adapters kept loaded per base model (LRU)
    serving_max_models: int = 2  # base models loaded at once (least recently used unloaded)
    # Where base_model (token stats, previews) may point; empty = any local dir or hub id.
    dataset_model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # Bus consumers: deliveries before a message is parked on the dead-letter subject.
    max_deliver: int = 5
    ack_wait_s: float = 60.0

    extra: dict[str, str] = Field(default_factory=dict)

    @field_validator("dataset_import_buckets", "dataset_import_roots", "dataset_model_roots",
                     "model_roots", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _read_s3_secret_key_file(self):
        if self.s3_secret_key_file is not None:
            self.s3_secret_key = self.s3_secret_key_file.read_text().strip()
        return self

    def db_url(self, service: str) -> str:
        if self.database_url:
            if self.database_password_file is None:
                return self.database_url
            return url_with_password(self.database_url,
                                     self.database_password_file.read_text().strip())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def addr(self, service: str) -> str:
        return getattr(self, f"{service}_addr")

    def listen_port(self, service: str) -> int:
        return self.grpc_port or DEFAULT_PORTS[service]


def url_with_password(url: str, password: str) -> str:
    """`url` with `password` as its password (percent-quoted, so any character is safe),
    replacing the one it has; its user stays as it is."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    if not at or not user:
        raise ValueError("LLMSTUDIO_DATABASE_URL needs a user for LLMSTUDIO_DATABASE_PASSWORD_FILE")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostport}"))


def get_settings(**overrides) -> Settings:
    return Settings(**overrides)
