"""Where the test suite's Postgres comes from.

In order: the server named by ``TIANSHU_TEST_DATABASE_URL``; else a ``postgres:15`` container
when a Docker engine answers; else the embedded Postgres of `tianshu_core.local.embedded`, on its own
data directory so that a test run never stops the server a demo is using.

`private_postgres()` is another embedded server, on a temporary data directory, for a test that
stops and starts it (the session's server and the machine's are never stopped).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tianshu_core.local import embedded

log = logging.getLogger(__name__)

TEST_DATABASE_URL_ENV = "TIANSHU_TEST_DATABASE_URL"
POSTGRES_IMAGE = "postgres:15"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a Postgres server the tests may create and drop databases on."""
    configured = os.environ.get(TEST_DATABASE_URL_ENV)
    if configured:
        yield configured
    elif docker_answers():
        with _container() as url:
            yield url
    else:
        with _embedded() as url:
            yield url


def docker_answers() -> bool:
    """True when a Docker engine answers a ping within a few seconds."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    # With no engine the SDK leaves a socket for the garbage collector, and the suite's
    # warnings-as-errors would turn its ResourceWarning into an "unraisable exception".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@contextlib.contextmanager
def _container() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.10
        from testcontainers.postgres import PostgresContainer  # type: ignore[no-redef, unused-ignore]

    log.info("starting a %s container for the tests", POSTGRES_IMAGE)
    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield container.get_connection_url()


def embedded_pgdata() -> Path:
    """The tests' own data directory, next to the demo's."""
    return embedded.default_pgdata().with_name("pgdata-tests")


@contextlib.contextmanager
def _embedded() -> Iterator[str]:
    server = embedded.start(embedded_pgdata())
    try:
        yield server.url
    finally:
        # Stop only a server this session started: another session may be using one it found.
        if server.started:
            embedded.stop(server.pgdata)


@dataclass
class PrivatePostgres:
    """An embedded Postgres on a data directory of its own; `stop()` and `start()` keep its port."""

    pgdata: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if not embedded.stop(self.pgdata):
            raise RuntimeError(f"the private Postgres on {self.pgdata} was not running")

    def start(self) -> None:
        # embedded.start() probes a new free port on every start, and the services keep the URL
        # they were given: make it take the old one (free since the stop).
        probe = embedded._free_port
        embedded._free_port = lambda: self.port
        try:
            server = embedded.start(self.pgdata)
        finally:
            embedded._free_port = probe
        if not (server.started and server.port == self.port):
            raise RuntimeError(f"the private Postgres did not start on port {self.port}: {server}")


@contextlib.contextmanager
def private_postgres(prefix: str = "tianshu-pg-") -> Iterator[PrivatePostgres]:
    """A running private Postgres, stopped and deleted at the end."""
    # Under /tmp (not pytest's 0700 tmp dir), so that the unprivileged server user (when we are
    # root) can reach its data directory.
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    pgdata = workdir / "pgdata"
    try:
        server = embedded.start(pgdata)
        yield PrivatePostgres(pgdata, server.port)
    finally:
        embedded.stop(pgdata)
        shutil.rmtree(workdir, ignore_errors=True)
