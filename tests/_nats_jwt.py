"""NATS decentralized auth for the tests: operator, account and user JWTs, and `.creds` files.

What `nsc` makes for an operator's deployment, minted here in Python with the `nkeys` package (a
dependency of `nats-py[nkeys]`): an `Operator` with its system account, accounts it signs (with
JetStream unless told otherwise), and users an account signs, each written as a `.creds` file, the
file ``TIANSHU_NATS_CREDS_FILE`` names. `Operator.trust()` is what `NatsServer(operator=...)` needs
to run in operator mode; an account left out of it is one the server does not know.

A JWT is three base64url parts without padding: the header `{"typ":"JWT","alg":"ed25519-nkey"}`,
the claims (`jti`, `iat`, `iss` the signer's public key, `sub` the subject's, `name`, and `nats`
with the type and its limits), and the ed25519 signature of the first two by the issuer's NKey.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]

from tests._nats import OperatorTrust

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = -1
# What an account may do: everything, with no limit (as `nsc add account` leaves it).
ACCOUNT_LIMITS: dict[str, Any] = {
    "subs": UNLIMITED,
    "data": UNLIMITED,
    "payload": UNLIMITED,
    "imports": UNLIMITED,
    "exports": UNLIMITED,
    "wildcards": True,
    "conn": UNLIMITED,
    "leaf": UNLIMITED,
}
# JetStream is on for an account whose memory or disk storage is not 0; -1 is no limit.
JETSTREAM_LIMITS: dict[str, Any] = {
    "mem_storage": UNLIMITED,
    "disk_storage": UNLIMITED,
    "streams": UNLIMITED,
    "consumer": UNLIMITED,
}
USER_LIMITS: dict[str, Any] = {"subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED}


@dataclass(frozen=True)
class NKey:
    """An NKey pair: the seed (secret, starts with 'S') and the public key ('O', 'A' or 'U' first)."""

    seed: str
    public_key: str

    @classmethod
    def new(cls, prefix: int) -> NKey:
        """A fresh key of one role: `nkeys.PREFIX_BYTE_OPERATOR`, `_ACCOUNT` or `_USER`."""
        seed: bytes = nkeys.encode_seed(os.urandom(32), prefix)
        public_key: bytes = nkeys.from_seed(bytearray(seed)).public_key
        return cls(seed=seed.decode(), public_key=public_key.decode())

    def sign(self, data: bytes) -> bytes:
        """The raw ed25519 signature of `data`."""
        signature: bytes = nkeys.from_seed(bytearray(self.seed.encode())).sign(data)
        return signature


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def encode_jwt(issuer: NKey, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A JWT about `subject`, signed by `issuer`. Its `jti` is a hash of the claims, as nsc makes it."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key,
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    digest = hashlib.new("sha512_256", json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = f"{_b64(json.dumps(HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def creds_text(user_jwt: str, user_seed: str) -> str:
    """The text of a `.creds` file, as nsc writes it: the user's JWT, then its NKey seed."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


@dataclass(frozen=True)
class User:
    """A user an account signed: its key, its JWT, and the account that signed it."""

    name: str
    key: NKey
    jwt: str
    account: str

    def write_creds(self, path: Path) -> Path:
        """Write this user's `.creds` file (owner-only, as a secret should be) and return its path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(creds_text(self.jwt, self.key.seed))
        path.chmod(0o600)
        return path


@dataclass(frozen=True)
class Account:
    """An account an operator signed; `user()` mints users of it."""

    name: str
    key: NKey
    jwt: str

    def user(self, name: str) -> User:
        """A new user of this account, with no limits and every subject allowed."""
        key = NKey.new(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, **USER_LIMITS}
        jwt = encode_jwt(self.key, key.public_key, name, claims)
        return User(name=name, key=key, jwt=jwt, account=self.key.public_key)


@dataclass
class Operator:
    """An operator (self-signed) and its system account; `account()` signs more accounts."""

    name: str = "tianshu-test"
    key: NKey = field(default_factory=lambda: NKey.new(nkeys.PREFIX_BYTE_OPERATOR))
    system: Account = field(init=False)

    def __post_init__(self) -> None:
        self.system = self.account("SYS", jetstream=False)

    @property
    def jwt(self) -> str:
        claims = {"type": "operator", "system_account": self.system.key.public_key}
        return encode_jwt(self.key, self.key.public_key, self.name, claims)

    def account(self, name: str, *, jetstream: bool = True) -> Account:
        """A new account signed by this operator (JetStream on, without limits, unless told not to)."""
        key = NKey.new(nkeys.PREFIX_BYTE_ACCOUNT)
        limits = {**ACCOUNT_LIMITS, **(JETSTREAM_LIMITS if jetstream else {})}
        jwt = encode_jwt(self.key, key.public_key, name, {"type": "account", "limits": limits})
        return Account(name=name, key=key, jwt=jwt)

    def trust(self, accounts: Iterable[Account]) -> OperatorTrust:
        """What a server needs to trust this operator and know `accounts` (and the system account)."""
        known = [self.system, *accounts]
        return OperatorTrust(
            operator_jwt=self.jwt,
            system_account=self.system.key.public_key,
            accounts={a.key.public_key: a.jwt for a in known},
        )
