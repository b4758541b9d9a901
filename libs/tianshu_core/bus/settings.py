"""NATS connection settings, from the environment (prefix `TIANSHU_NATS_`) or given directly.

Secrets (password, token) may come from the variable itself or from a file named by the `_FILE`
variant (how container secrets are mounted); they are `SecretStr`, so they never print.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class NatsSettings(BaseSettings):
    """How to reach NATS: URL(s), authentication, TLS, timeouts."""

    model_config = SettingsConfigDict(env_prefix="TIANSHU_NATS_", extra="ignore")

    url: str = Field(
        default="nats://127.0.0.1:4222",
        description="One URL or several separated by commas. Credentials in the URL work but are "
        "better given below.",
    )
    name: str | None = Field(default=None, description="Connection name shown by the server's monitoring.")
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    creds_file: Path | None = Field(default=None, description="A .creds file (user JWT and NKey seed).")
    nkey_seed_file: Path | None = Field(default=None, description="A file holding a user NKey seed.")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle to verify the server with (else the system's store)."
    )
    tls_cert_file: Path | None = Field(default=None, description="Client certificate, for mutual TLS.")
    tls_key_file: Path | None = None
    tls_hostname: str | None = Field(
        default=None, description="Name to verify the server certificate against."
    )
    tls: bool = Field(default=False, description="Require TLS even when no CA file is given.")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="One connection attempt.")
    startup_timeout_s: float = Field(
        default=15.0, gt=0, description="How long start-up keeps retrying an unreachable server."
    )
    reconnect_time_wait_s: float = Field(default=1.0, gt=0, description="Pause between reconnect attempts.")
    ping_interval_s: float = Field(default=20.0, gt=0)
    drain_timeout_s: float = Field(default=10.0, gt=0)
    request_timeout_s: float = Field(default=5.0, gt=0, description="JetStream API and publish acks.")

    @model_validator(mode="after")
    def _one_way_per_secret(self) -> NatsSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set TIANSHU_NATS_PASSWORD or TIANSHU_NATS_PASSWORD_FILE, not both")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set TIANSHU_NATS_TOKEN or TIANSHU_NATS_TOKEN_FILE, not both")
        if self.creds_file is not None and self.nkey_seed_file is not None:
            raise ValueError("set TIANSHU_NATS_CREDS_FILE or TIANSHU_NATS_NKEY_SEED_FILE, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TIANSHU_NATS_TLS_CERT_FILE and TIANSHU_NATS_TLS_KEY_FILE go together")
        return self

    def resolved_password(self) -> str | None:
        """The password, read from its file when one is named."""
        return _secret(self.password, self.password_file)

    def resolved_token(self) -> str | None:
        """The token, read from its file when one is named."""
        return _secret(self.token, self.token_file)

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def wants_tls(self) -> bool:
        return (
            self.tls
            or self.tls_ca_file is not None
            or self.tls_cert_file is not None
            or any(u.startswith("tls://") for u in self.servers)
        )


def _secret(value: SecretStr | None, path: Path | None) -> str | None:
    if path is not None:
        return path.read_text().strip()
    return value.get_secret_value() if value is not None else None
