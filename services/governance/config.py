"""Governance's own settings (`LLMSTUDIO_AUDIT_*`): when the audit chain is checkpointed, and
the file of the key that signs the checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuditAnchorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMSTUDIO_AUDIT_", extra="ignore")

    # A checkpoint is signed once this many records are unanchored, or this long after the
    # last one when any are: what an attacker who can write the database may still rewrite.
    checkpoint_every_records: Annotated[int, Field(ge=1)] = 1000
    checkpoint_every_s: Annotated[float, Field(gt=0)] = 300.0
    # PEM (PKCS#8) ed25519 private key; made on first start. Default: <data_dir>/governance/
    # audit-signing-key.pem. Keep it where the database's writers cannot read it.
    signing_key_file: Path | None = None

    def key_path(self, data_dir: Path) -> Path:
        return self.signing_key_file or Path(data_dir) / "governance" / "audit-signing-key.pem"


class PromotionSettings(BaseSettings):
    """`LLMSTUDIO_PROMOTION_*`: how long a promotion request waits for its approvals, and how
    often open requests are swept for expiry (they are also checked whenever touched)."""

    model_config = SettingsConfigDict(env_prefix="LLMSTUDIO_PROMOTION_", extra="ignore")

    request_ttl_s: Annotated[float, Field(gt=0)] = 7 * 86400.0
    sweep_every_s: Annotated[float, Field(gt=0)] = 60.0
