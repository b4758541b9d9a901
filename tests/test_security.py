"""Secure connections: NATS token, creds file (operator JWTs) and TLS for the scheduler process,
and Postgres TLS that verifies.

Postgres TLS runs against a real server with `ssl=on`: a private Postgres started for this module
from the distribution's binaries (/usr/lib/postgresql/<v>/bin, built with OpenSSL), as the
unprivileged 'tianshu' user when we are root, on a free port of 127.0.0.1. The embedded Postgres
of the `pgserver` wheel cannot serve: its binaries are built without OpenSSL ("ssl=on" is refused).
With no such binaries the server tests skip; the TLS-context tests below them run anyway.

The same module also runs the scheduler against a NATS 2.9 server (what Debian stable ships).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client

from tests._nats import NatsServer, NatsServerFactory, TlsFiles, make_ca
from tests._nats_jwt import Operator
from tests._services import SchedulerProcess, executions
from tests.test_scheduler_scale import fresh_database
from tianshu_core import ExecutionState, connect_postgres
from tianshu_core.local import embedded
from tianshu_core.stores.postgres import _backend
from tianshu_core.stores.postgres._backend import PostgresTlsError, postgres_ssl

LOCALHOST_ONLY_EXT = (
    "subjectAltName=DNS:localhost\n"
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth\n"
    "authorityKeyIdentifier=keyid\n"
)
PASSWORD = "pw-never-logged-7d1e"


# Helpers ----------------------------------------------------------------------------------------


async def start_case(nc: Client, code: str, input: Any = None) -> str:
    body = {"kind": "start_case", "workflow_code": code, "input": input}
    reply = json.loads((await nc.request("tianshu.v1.rpc.cases.start", json.dumps(body).encode(), 10)).data)
    assert reply["kind"] == "start_case_accepted", reply
    return str(reply["case_key"])


async def wait_state(url: str, key: str, state: ExecutionState, within: float = 20.0) -> Any:
    """The case once it is in `state` (polling Postgres, the record)."""
    stores = await connect_postgres(url, max_size=1)
    try:
        deadline = time.monotonic() + within
        while True:
            case = await stores.cases.get_by_key(key)
            if case is not None and case.execution_state is state:
                return case
            if time.monotonic() > deadline:
                raise AssertionError(f"case {key} is not {state.value}: {case}")
            await asyncio.sleep(0.05)
    finally:
        await stores.close()


def exits_at_start(proc: SchedulerProcess, within: float = 20.0) -> tuple[int, str, float]:
    """Start a scheduler that must refuse to start: (exit code, its whole output, seconds taken)."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="scheduler exited with"):
        proc.start(timeout_s=within)
    assert proc.proc is not None
    return proc.proc.returncode, proc.log_file.read_text(errors="replace"), time.monotonic() - started


def nats_identities(server: NatsServer) -> dict[str, tuple[str, str]]:
    """Who each client of `server` authenticated as: connection name -> (user key, account key)."""
    url = f"http://127.0.0.1:{server.monitor_port}/connz?auth=true"
    with urllib.request.urlopen(url, timeout=5) as answer:
        connections = json.load(answer)["connections"]
    return {c.get("name", ""): (c.get("authorized_user", ""), c.get("account", "")) for c in connections}


@pytest.fixture(scope="module")
async def db_url(pg_server_url: str) -> AsyncIterator[str]:
    """A database of this module's own (so the schedulers adopt no other test's runnable cases)."""
    async with fresh_database(pg_server_url, "tianshu_security") as url:
        yield url


# NATS: token and TLS, with the scheduler as a process ---------------------------------------------


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_scheduler_with_a_token_runs_and_with_a_wrong_token_exits_clearly(
    tmp_path: Path, db_url: str, make_nats_server: NatsServerFactory
) -> None:
    token, wrong = f"tok-{uuid.uuid4().hex}", f"bad-{uuid.uuid4().hex}"
    server = make_nats_server(token=token)
    with SchedulerProcess(tmp_path / "right", db_url, server.url, TIANSHU_NATS_TOKEN=token) as sched:
        nc = await nats.connect(server.url, token=token)
        try:
            key = await start_case(nc, "e2e_steps", {"steps": 2})
            await wait_state(db_url, key, ExecutionState.FINISHED)
        finally:
            await nc.close()
        log = sched.log_file.read_text(errors="replace")
    assert executions(tmp_path / "right")[(key, "s1")] == 1
    assert token not in log

    bad = SchedulerProcess(tmp_path / "wrong", db_url, server.url, TIANSHU_NATS_TOKEN=wrong)
    code, output, took = exits_at_start(bad)
    assert code != 0
    assert took < 10, "a refused token must stop the start at once, not after the start-up timeout"
    assert "refused the connection" in output and "TIANSHU_NATS_TOKEN" in output, output
    assert "Traceback" not in output, output
    assert wrong not in output and token not in output


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_scheduler_with_a_creds_file_runs_and_with_an_unknown_account_exits_clearly(
    tmp_path: Path, db_url: str, make_nats_server: NatsServerFactory
) -> None:
    """Operator mode (decentralized JWT auth): the scheduler authenticates with a `.creds` file."""
    operator = Operator()
    account = operator.account("TIANSHU")
    server = make_nats_server(operator=operator.trust([account]))
    scheduler_user, client_user = account.user("scheduler"), account.user("client")
    creds = scheduler_user.write_creds(tmp_path / "creds" / "scheduler.creds")
    client_creds = client_user.write_creds(tmp_path / "creds" / "client.creds")
    env = {"TIANSHU_NATS_CREDS_FILE": str(creds)}
    with SchedulerProcess(tmp_path / "right", db_url, server.url, **env) as sched:
        nc = await nats.connect(server.url, user_credentials=str(client_creds))
        try:
            key = await start_case(nc, "e2e_steps", {"steps": 2})
            await wait_state(db_url, key, ExecutionState.FINISHED)
        finally:
            await nc.close()
        identity = nats_identities(server)[f"tianshu-scheduler-{sched.name}"]
        log = sched.log_file.read_text(errors="replace")
    assert identity == (scheduler_user.key.public_key, account.key.public_key)
    assert executions(tmp_path / "right")[(key, "s1")] == 1
    assert scheduler_user.key.seed not in log

    # A user signed by an account this server does not know (another operator's).
    stranger = Operator().account("ELSEWHERE").user("scheduler")
    wrong = stranger.write_creds(tmp_path / "creds" / "stranger.creds")
    bad = SchedulerProcess(tmp_path / "wrong", db_url, server.url, TIANSHU_NATS_CREDS_FILE=str(wrong))
    code, output, took = exits_at_start(bad)
    assert code != 0
    assert took < 10, "refused credentials must stop the start at once, not after the start-up timeout"
    assert "refused the connection" in output and "TIANSHU_NATS_CREDS_FILE" in output, output
    assert "Traceback" not in output, output
    assert stranger.key.seed not in output and scheduler_user.key.seed not in output

    # Without credentials the server in operator mode refuses too: the creds file is what let it in.
    plain = SchedulerProcess(tmp_path / "none", db_url, server.url)
    code, output, _ = exits_at_start(plain)
    assert code != 0 and "refused the connection" in output and "no credentials" in output, output
    assert "Traceback" not in output, output


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_scheduler_verifies_the_nats_server_against_its_ca(
    tmp_path: Path, db_url: str, make_nats_server: NatsServerFactory, tls_files: TlsFiles
) -> None:
    server = make_nats_server(tls=tls_files)
    assert server.url.startswith("tls://")
    env = {"TIANSHU_NATS_TLS_CA_FILE": str(tls_files.ca)}
    with SchedulerProcess(tmp_path / "right", db_url, server.url, **env):
        client_tls = ssl.create_default_context(cafile=str(tls_files.ca))
        nc = await nats.connect(server.url, tls=client_tls)
        try:
            key = await start_case(nc, "e2e_steps", {"steps": 1})
            await wait_state(db_url, key, ExecutionState.FINISHED)
        finally:
            await nc.close()

    other_ca, _ = make_ca(tmp_path / "other-ca", "other")
    bad = SchedulerProcess(tmp_path / "wrong", db_url, server.url, TIANSHU_NATS_TLS_CA_FILE=str(other_ca))
    code, output, took = exits_at_start(bad)
    assert code != 0 and took < 10
    assert "TLS with NATS" in output and "certificate verify failed" in output, output
    assert str(other_ca) in output, "the message names what the certificate was checked against"
    assert "Traceback" not in output, output

    # No CA at all: the system's store does not know the test CA either.
    plain = SchedulerProcess(tmp_path / "system", db_url, server.url)
    code, output, _ = exits_at_start(plain)
    assert code != 0 and "TLS with NATS" in output and "system's CA store" in output, output


# NATS 2.9 --------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_scheduler_on_a_nats_2_9_server(
    tmp_path: Path, db_url: str, make_nats_server: NatsServerFactory, legacy_nats_server: Path
) -> None:
    """Start, wait, wake by a raw publish, finish: on the server Debian stable ships."""
    server = make_nats_server(binary=legacy_nats_server)
    assert server.version()[:2] == (2, 9)
    with SchedulerProcess(tmp_path, db_url, server.url) as sched:
        nc = await nats.connect(server.url)
        try:
            assert nc.connected_server_version.minor == 9
            key = await start_case(nc, "e2e_wait")
            await wait_state(db_url, key, ExecutionState.WAITING)
            await nc.jetstream().publish(
                f"tianshu.v1.events.order.{key}",
                json.dumps({"paid": 29}).encode(),
                headers={"Nats-Msg-Id": key},
            )
            done = await wait_state(db_url, key, ExecutionState.FINISHED)
        finally:
            await nc.close()
        assert sched.proc is not None and sched.proc.poll() is None
    assert done.output == {"paid": 29}
    assert executions(tmp_path)[(key, "after")] == 1


# Postgres TLS: how the context is built (no server needed) ------------------------------------------


@pytest.fixture
def no_pg_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PG* TLS variables, no opt-out, and a HOME without ~/.postgresql/root.crt."""
    for name in (
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLCRL",
        _backend.TLS_INSECURE_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.mark.usefixtures("no_pg_env")
def test_no_tls_unless_the_url_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    assert postgres_ssl("postgresql://u@db:5432/x") is False  # libpq (and asyncpg) would try TLS unverified
    assert postgres_ssl("postgresql://u@db:5432/x?sslmode=disable") is False
    monkeypatch.setenv("PGSSLMODE", "require")  # libpq's variable counts when the URL says nothing
    assert isinstance(postgres_ssl("postgresql://u@db:5432/x"), ssl.SSLContext)
    assert postgres_ssl("postgresql://u@db:5432/x?sslmode=disable") is False  # the URL wins


@pytest.mark.usefixtures("no_pg_env")
@pytest.mark.parametrize(
    ("mode", "hostname"),
    [("allow", True), ("prefer", True), ("require", True), ("verify-ca", False), ("verify-full", True)],
)
def test_every_mode_that_asks_for_tls_verifies(mode: str, hostname: bool) -> None:
    context = postgres_ssl(f"postgresql://u@db/x?sslmode={mode}")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is hostname
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.cert_store_stats()["x509_ca"] > 0 or not ssl.get_default_verify_paths().cafile


@pytest.mark.usefixtures("no_pg_env")
def test_sslrootcert_is_the_only_trust_anchor(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    ca, _ = make_ca(tmp_path / "ca")
    context = postgres_ssl(f"postgresql://u@db/x?sslmode=require&sslrootcert={ca}")
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] == 1  # the test CA, not the system's store besides
    assert context.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.usefixtures("no_pg_env")
def test_the_insecure_opt_out_is_loud_and_limited(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv(_backend.TLS_INSECURE_ENV, "true")
    context = postgres_ssl(f"postgresql://u:{PASSWORD}@db:5433/x?sslmode=require")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_NONE
    assert "NOT verified" in caplog.text and "db:5433" in caplog.text and PASSWORD not in caplog.text
    # verify-full / verify-ca ask for verification by name: the opt-out does not weaken them.
    strict = postgres_ssl("postgresql://u@db/x?sslmode=verify-full")
    assert isinstance(strict, ssl.SSLContext) and strict.verify_mode is ssl.CERT_REQUIRED
    assert "is ignored for sslmode=verify-full" in caplog.text
    monkeypatch.setenv(_backend.TLS_INSECURE_ENV, "maybe")
    with pytest.raises(PostgresTlsError, match="must be true or false"):
        postgres_ssl("postgresql://u@db/x?sslmode=require")


@pytest.mark.usefixtures("no_pg_env")
def test_bad_tls_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PostgresTlsError, match="not one of"):
        postgres_ssl("postgresql://u@db/x?sslmode=sometimes")
    missing = tmp_path / "nope.pem"
    with pytest.raises(PostgresTlsError, match=r"sslrootcert in the database URL names .*nope\.pem") as info:
        postgres_ssl(f"postgresql://u:{PASSWORD}@db/x?sslmode=verify-full&sslrootcert={missing}")
    assert PASSWORD not in str(info.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(PostgresTlsError, match="cannot load the TLS files"):
        postgres_ssl(f"postgresql://u@db/x?sslmode=require&sslrootcert={garbage}")


@pytest.mark.usefixtures("no_pg_env")
async def test_a_server_without_tls_is_a_clear_error_not_a_retry_loop() -> None:
    """A server that answers the SSLRequest with 'N' (no TLS), as a Postgres without ssl does."""

    async def no_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readexactly(8)
            writer.write(b"N")
            await writer.drain()
            await reader.read(1)
        writer.close()

    server = await asyncio.start_server(no_tls, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(PostgresTlsError, match="does not offer TLS") as info:
            await connect_postgres(f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/x?sslmode=require")
        assert time.monotonic() - started < 2, "not retried: no retry can give the server TLS"
        assert PASSWORD not in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    finally:
        server.close()
        await server.wait_closed()


# Postgres TLS against a real server -------------------------------------------------------------


def _ssl_capable_bin_dir() -> Path | None:
    """A Postgres bin directory built with OpenSSL: TIANSHU_TEST_PG_BIN, else /usr/lib/postgresql/*."""
    configured = os.environ.get("TIANSHU_TEST_PG_BIN")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bin_dir in candidates:
        pg_config = bin_dir / "pg_config"
        if not (bin_dir / "postgres").exists() or not pg_config.exists():
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            flags = subprocess.run(
                [str(pg_config), "--configure"], capture_output=True, text=True, timeout=10
            ).stdout
            if "--with-openssl" in flags or "--with-ssl=openssl" in flags:
                return bin_dir
    return None


@dataclass(frozen=True)
class TlsPostgres:
    """A Postgres with ssl=on whose certificate (for DNS:localhost only) the test CA signed."""

    port: int
    ca: Path
    other_ca: Path

    def url(self, host: str = "localhost", query: str = "", *, password: bool = False) -> str:
        auth = f"postgres:{PASSWORD}" if password else "postgres"
        return f"postgresql://{auth}@{host}:{self.port}/postgres" + (f"?{query}" if query else "")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _server_cert(directory: Path, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    """A server certificate for DNS:localhost (not 127.0.0.1), signed by `ca`."""
    key, csr, cert, ext = (directory / n for n in ("server.key", "server.csr", "server.crt", "server.ext"))
    ext.write_text(LOCALHOST_ONLY_EXT)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    """Start a private Postgres with ssl=on for this module (as 'tianshu' when root); stop it after."""
    bin_dir = _ssl_capable_bin_dir()
    if bin_dir is None:
        pytest.skip("no Postgres built with OpenSSL here (set TIANSHU_TEST_PG_BIN)")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    # Under /tmp (not pytest's 0700 tmp dir), so the unprivileged server user can reach it.
    workdir = Path(tempfile.mkdtemp(prefix="tianshu-pgtls-"))
    workdir.chmod(0o755)
    pgdata = workdir / "pgdata"
    account = embedded._service_account()
    try:
        certs = workdir / "certs"
        ca, ca_key = make_ca(certs, "ca")
        other_ca, _ = make_ca(certs, "other")
        cert, key = _server_cert(certs, ca, ca_key)
        pgdata.mkdir(mode=0o700)
        if account is not None:
            os.chown(pgdata, account.uid, account.gid)
        embedded._run(
            account,
            bin_dir / "initdb",
            ["-D", str(pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale"],
        )
        for source, name in ((cert, "server.crt"), (key, "server.key")):
            target = pgdata / name
            shutil.copyfile(source, target)
            target.chmod(0o600)  # Postgres refuses a key that others can read
            if account is not None:
                os.chown(target, account.uid, account.gid)
        port = embedded._free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' "
            "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c fsync=off"
        )
        log = pgdata / "server.log"
        try:
            embedded._run(
                account,
                bin_dir / "pg_ctl",
                ["start", "-D", str(pgdata), "-w", "-t", "60", "-l", str(log), "-o", options],
            )
        except embedded.EmbeddedPostgresError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text(errors='replace') if log.exists() else ''}") from exc
        try:
            yield TlsPostgres(port=port, ca=ca, other_ca=other_ca)
        finally:
            embedded._run(account, bin_dir / "pg_ctl", ["stop", "-D", str(pgdata), "-m", "immediate", "-w"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _uses_tls(conn: asyncpg.Connection[asyncpg.Record] | Any) -> bool:
    return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


@pytest.mark.postgres
@pytest.mark.usefixtures("no_pg_env")
async def test_postgres_tls_right_ca_connects_verified(tls_postgres: TlsPostgres) -> None:
    for mode in ("verify-full", "verify-ca", "require", "prefer"):
        url = tls_postgres.url(query=f"sslmode={mode}&sslrootcert={tls_postgres.ca}")
        conn = await _backend.connect(url)
        try:
            assert await _uses_tls(conn), mode
        finally:
            await conn.close()
    # The whole store stack, migrations included (they open their own connection).
    url = tls_postgres.url(query=f"sslmode=verify-full&sslrootcert={tls_postgres.ca}")
    stores = await connect_postgres(url, migrate=True, max_size=2)
    try:
        pool = stores.cases._db.pool  # type: ignore[attr-defined]
        async with pool.acquire() as conn:
            assert await _uses_tls(conn)
        assert await stores.cases.get_by_key("nobody") is None
    finally:
        await stores.close()


@pytest.mark.postgres
@pytest.mark.usefixtures("no_pg_env")
async def test_postgres_tls_wrong_ca_is_refused_clearly_and_at_once(tls_postgres: TlsPostgres) -> None:
    for mode in ("verify-full", "require"):
        url = tls_postgres.url(query=f"sslmode={mode}&sslrootcert={tls_postgres.other_ca}", password=True)
        started = time.monotonic()
        with pytest.raises(PostgresTlsError) as info:
            await connect_postgres(url, migrate=mode == "require")
        assert time.monotonic() - started < 2, "a certificate that does not verify is not retried"
        message = str(info.value)
        assert f"TLS with Postgres at localhost:{tls_postgres.port} failed" in message, message
        assert "did not verify" in message and str(tls_postgres.other_ca) in message, message
        assert PASSWORD not in message
    # require with no sslrootcert: the system's store, which does not know the test CA.
    with pytest.raises(PostgresTlsError, match="system's CA store") as info:
        await connect_postgres(tls_postgres.url(query="sslmode=require"))
    assert "TIANSHU_DATABASE_TLS_INSECURE" in str(info.value)


@pytest.mark.postgres
@pytest.mark.usefixtures("no_pg_env")
async def test_postgres_tls_checks_the_host_name_except_for_verify_ca(tls_postgres: TlsPostgres) -> None:
    """The certificate names localhost only: 127.0.0.1 passes verify-ca but not verify-full/require."""
    for mode in ("verify-full", "require"):
        url = tls_postgres.url("127.0.0.1", f"sslmode={mode}&sslrootcert={tls_postgres.ca}")
        with pytest.raises(
            PostgresTlsError, match=r"mismatch, certificate is not valid for '127\.0\.0\.1'"
        ) as info:
            await _backend.connect(url)
        assert "sslmode=verify-ca" in str(info.value)
    conn = await _backend.connect(
        tls_postgres.url("127.0.0.1", f"sslmode=verify-ca&sslrootcert={tls_postgres.ca}")
    )
    try:
        assert await _uses_tls(conn)
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.usefixtures("no_pg_env")
async def test_postgres_no_tls_when_the_url_does_not_ask(tls_postgres: TlsPostgres) -> None:
    for url in (tls_postgres.url(), tls_postgres.url(query="sslmode=disable")):
        stores = await connect_postgres(url, max_size=1, migrate=True)
        try:
            async with stores.cases._db.pool.acquire() as conn:  # type: ignore[attr-defined]
                assert not await _uses_tls(conn), url
        finally:
            await stores.close()


@pytest.mark.postgres
@pytest.mark.usefixtures("no_pg_env")
async def test_postgres_insecure_opt_out_encrypts_without_verifying(
    tls_postgres: TlsPostgres, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv(_backend.TLS_INSECURE_ENV, "true")
    stores = await connect_postgres(tls_postgres.url(query="sslmode=require"), max_size=1)
    try:
        async with stores.cases._db.pool.acquire() as conn:  # type: ignore[attr-defined]
            assert await _uses_tls(conn)
    finally:
        await stores.close()
    assert "NOT verified" in caplog.text
    with pytest.raises(PostgresTlsError):  # verify-full still verifies
        await _backend.connect(
            tls_postgres.url(query=f"sslmode=verify-full&sslrootcert={tls_postgres.other_ca}")
        )


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_scheduler_on_a_tls_postgres(tls_postgres: TlsPostgres, tmp_path: Path, nats_url: str) -> None:
    """The scheduler process: the right CA works end to end; a wrong one stops it at start, clearly."""
    database = f"tianshu_tls_{uuid.uuid4().hex[:8]}"
    admin = await _backend.connect(
        tls_postgres.url(query=f"sslmode=verify-full&sslrootcert={tls_postgres.ca}")
    )
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    good = f"postgresql://postgres@localhost:{tls_postgres.port}/{database}?sslmode=verify-full&sslrootcert={tls_postgres.ca}"
    env = {"TIANSHU_MIGRATE_ON_START": "true", "HOME": str(tmp_path)}
    with SchedulerProcess(tmp_path / "right", good, nats_url, **env):
        nc = await nats.connect(nats_url)
        try:
            key = await start_case(nc, "e2e_steps", {"steps": 1})
            await wait_state(good, key, ExecutionState.FINISHED)
        finally:
            await nc.close()
    bad_url = good.replace(str(tls_postgres.ca), str(tls_postgres.other_ca)).replace(
        "postgres@", f"postgres:{PASSWORD}@"
    )
    code, output, took = exits_at_start(SchedulerProcess(tmp_path / "wrong", bad_url, nats_url, **env))
    assert code != 0 and took < 10
    assert "TLS with Postgres" in output and "did not verify" in output, output
    assert PASSWORD not in output and "Traceback" not in output, output
