"""Settings from the environment (prefix `TIANSHU_`); each has a default that works locally."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine import EngineConfig


class Settings(BaseSettings):
    """The core's settings, shared by the CLI and the services."""

    model_config = SettingsConfigDict(env_prefix="TIANSHU_", extra="ignore")

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="Postgres URL (asyncpg form). TLS options in the URL are honoured, and stricter "
        "than libpq's: any sslmode that asks for TLS (require included) verifies the certificate "
        "against sslrootcert or the system's CA store; no sslmode means no TLS.",
    )
    database_tls_insecure: bool = Field(
        default=False,
        description="Encrypt without verifying the server's certificate for sslmode=allow/prefer/require "
        "(a development server with a self-signed certificate). Logged as a warning on every connect; "
        "never weakens verify-ca or verify-full. Read from the environment by the Postgres stores.",
    )
    migrate_on_start: bool = Field(default=False, description="Apply pending migrations on start.")
    migration_lock_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a migration statement waits for a lock before the migration fails (run "
        "it again later) instead of queueing the table's queries behind it. Read from the environment "
        "by the migration runner.",
    )
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1, description="Keep small: the server allows ~100 in all.")
    max_step_result_bytes: int = Field(default=1024 * 1024, ge=1)
    max_event_payload_bytes: int = Field(default=1024 * 1024, ge=1)
    lease_ttl_s: float = Field(default=30.0, gt=0)
    event_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    history_retention_s: float | None = Field(default=None, description="Unset: keep case history forever.")
    max_failed_runs: int = Field(
        default=5,
        ge=1,
        description="A case whose runs fail this many times in a row for a reason that is neither the "
        "workflow's own error nor an outage (a store error such as a deadlock or a statement timeout, "
        "a bug) fails with the last error. Outages never count.",
    )
    failed_run_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="Wait before such a case runs again; doubles with each failure in a row.",
    )
    failed_run_backoff_max_s: float = Field(default=60.0, ge=0, description="The longest such wait.")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_step_result_bytes=self.max_step_result_bytes,
            max_event_payload_bytes=self.max_event_payload_bytes,
            lease_ttl=self.lease_ttl_s,
            event_retention=timedelta(seconds=self.event_retention_s),
            history_retention=(
                timedelta(seconds=self.history_retention_s) if self.history_retention_s is not None else None
            ),
            max_failed_runs=self.max_failed_runs,
            failed_run_backoff=self.failed_run_backoff_s,
            failed_run_backoff_max=self.failed_run_backoff_max_s,
        )
