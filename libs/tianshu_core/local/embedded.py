"""An embedded Postgres for `make demo` and the tests, run from the binaries in the `pgserver` wheel.

`database_url()` returns ``TIANSHU_DATABASE_URL`` when it is set. Otherwise it starts (or reuses) a
Postgres server whose data lives in ``TIANSHU_EMBEDDED_PGDATA`` (default ``~/.cache/tianshu/pgdata``),
listening on a free TCP port of 127.0.0.1, and returns ``postgresql://postgres@127.0.0.1:<port>/postgres``.
The server outlives the process that started it, so the next call reuses it; every checkout and
virtualenv on the machine that uses the same data directory shares it, whichever started it first.
`database_url()` says so on stderr; `tianshu embedded status` shows it and `tianshu embedded stop`
(or `stop()`) ends it.

Postgres refuses to run as root. When we are root, initdb, pg_ctl and the server run as the system
user ``tianshu`` (created on first use; ``TIANSHU_EMBEDDED_USER`` names another), which owns the
data directory. Root's default data directory is ``/var/lib/tianshu/pgdata`` instead, because
``/root`` is closed to other users; any other ancestor that user cannot enter gets the search
(``o+x``) bit, with a warning.

We take only the binaries from `pgserver`, not its ``PostgresServer`` class: that one listens on a
Unix socket only, stops the server when the interpreter exits and, as root, makes every ancestor
directory of its data up to ``/`` readable by everyone.

Authentication is ``trust`` on 127.0.0.1: any local user can connect as the superuser. This is a
development server. POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TianshuError

__all__ = [
    "DATABASE_URL_ENV",
    "PGDATA_ENV",
    "USER_ENV",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "database_url",
    "default_pgdata",
    "start",
    "status",
    "stop",
]

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "TIANSHU_DATABASE_URL"
PGDATA_ENV = "TIANSHU_EMBEDDED_PGDATA"
USER_ENV = "TIANSHU_EMBEDDED_USER"

_DEFAULT_USER = "tianshu"
_SUPERUSER = "postgres"
_HOST = "127.0.0.1"
_TIMEOUT_S = 60
# Another process may take the free port between our probe and the server's bind.
_BIND_ATTEMPTS = 3


class EmbeddedPostgresError(TianshuError):
    """The embedded Postgres could not be set up, started or stopped."""

    code = "embedded_postgres"


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server."""

    pgdata: Path
    port: int
    pid: int
    started: bool = False
    """True when the call that returned this object started the server (rather than reusing it)."""

    @property
    def url(self) -> str:
        """URL of the server's ``postgres`` database, for asyncpg and libpq alike."""
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self.port}/postgres"

    @property
    def user(self) -> str:
        """The system user the server runs as: the owner of its data directory."""
        uid = self.pgdata.stat().st_uid
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    def notice(self) -> str:
        """What a user should know about this server: it outlives them and is shared."""
        how = "started" if self.started else "reusing"
        return (
            f"embedded Postgres: {how} the server on 127.0.0.1:{self.port} (pid {self.pid}, "
            f"user {self.user!r}, data {self.pgdata}). It keeps running after this program ends and "
            "serves every checkout on this machine that uses this data directory. "
            "`tianshu embedded status` shows it; `tianshu embedded stop` stops it."
        )


@dataclass(frozen=True)
class _Account:
    """The unprivileged user the server runs as when we are root."""

    name: str
    uid: int
    gid: int


def default_pgdata() -> Path:
    """The data directory used when none is given: ``TIANSHU_EMBEDDED_PGDATA`` or a per-user default."""
    configured = os.environ.get(PGDATA_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/tianshu/pgdata")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tianshu" / "pgdata"


def database_url() -> str:
    """``TIANSHU_DATABASE_URL`` if set, else the URL of the embedded server, started if need be.

    Using the embedded server prints its `notice()` on stderr: the server outlives the caller (a
    demo, `tianshu dev`), and nothing else would tell the user that a Postgres is left running."""
    configured = os.environ.get(DATABASE_URL_ENV)
    if configured:
        return configured
    server = start()
    print(server.notice(), file=sys.stderr, flush=True)
    return server.url


def status(pgdata: Path | None = None) -> EmbeddedPostgres | None:
    """The server running on ``pgdata``, or None."""
    return _running(_resolve(pgdata))


def start(pgdata: Path | None = None) -> EmbeddedPostgres:
    """Start a server on ``pgdata`` (initialising it on first use), or return the one already running."""
    pgdata = _resolve(pgdata)
    account = _service_account()
    bin_dir = _bin_dir()
    with _locked(pgdata):
        running = _running(pgdata)
        if running is not None:
            log.debug("reusing the embedded Postgres on port %d (%s)", running.port, pgdata)
            return running
        _prepare_directory(pgdata, account, bin_dir)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(pgdata, account, bin_dir)
        return _start_server(pgdata, account, bin_dir)


def stop(pgdata: Path | None = None) -> bool:
    """Stop the server running on ``pgdata``; False if none was running."""
    pgdata = _resolve(pgdata)
    with _locked(pgdata):
        if _running(pgdata) is None:
            return False
        # -m fast: roll back open sessions rather than wait for clients (tests, demos) to leave.
        args = ["stop", "-D", str(pgdata), "-m", "fast", "-w", "-t", str(_TIMEOUT_S)]
        _run(_service_account(), _bin_dir() / "pg_ctl", args)
    log.info("stopped the embedded Postgres (%s)", pgdata)
    return True


def _resolve(pgdata: Path | None) -> Path:
    return default_pgdata() if pgdata is None else pgdata.expanduser().absolute()


def _bin_dir() -> Path:
    # find_spec rather than import: pgserver's __init__ wires up things we do not use.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded Postgres needs the `pgserver` package: pip install 'tianshu[embedded]' "
            f"(or set {DATABASE_URL_ENV} to a server of your own)"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedPostgresError(f"no Postgres binaries in {bin_dir}; reinstall `pgserver`")
    return bin_dir


@contextlib.contextmanager
def _locked(pgdata: Path) -> Iterator[None]:
    """Serialise start and stop across processes (two test sessions, a demo and a test run)."""
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with (pgdata.parent / f".{pgdata.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _running(pgdata: Path) -> EmbeddedPostgres | None:
    """Read postmaster.pid; a server counts as running when its process lives and its port answers."""
    deadline = time.monotonic() + _TIMEOUT_S
    while True:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        # Lines: pid, data dir, start time, port, socket dir, listen address, shared memory, status.
        if len(lines) < 4 or not _pid_alive(int(lines[0])):
            return None
        status = lines[7].strip() if len(lines) >= 8 else "starting"
        if status == "ready":
            break
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(f"the server on {pgdata} stayed {status!r} for {_TIMEOUT_S} s")
        time.sleep(0.2)  # started or stopped outside our lock: wait for it to settle
    pid, port, listen = int(lines[0]), int(lines[3]), lines[5].strip()
    if not listen:
        raise EmbeddedPostgresError(
            f"a Postgres server runs on {pgdata} (pid {pid}) without a TCP listener; stop it first"
        )
    if not _port_answers(port):
        # The pid was reused by an unrelated process after a crash: the lock file is stale.
        return None
    return EmbeddedPostgres(pgdata=pgdata, port=port, pid=pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _service_account() -> _Account | None:
    """None when we are not root: the server then runs as ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(USER_ENV) or _DEFAULT_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if name != _DEFAULT_USER:
            raise EmbeddedPostgresError(f"{USER_ENV} names user {name!r}, which does not exist") from None
        entry = _create_system_user(name)
    if entry.pw_uid == 0:
        raise EmbeddedPostgresError(f"user {entry.pw_name!r} is root; Postgres needs an unprivileged user")
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> pwd.struct_passwd:
    shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false")
    command = ["useradd", "--system", "--user-group", "--no-create-home"]
    command += ["--home-dir", "/nonexistent", "--shell", shell, name]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.warning("could not create system user %r (%s); running Postgres as 'nobody'", name, detail)
        return pwd.getpwnam("nobody")
    log.info("created system user %r to run the embedded Postgres", name)
    return pwd.getpwnam(name)


def _prepare_directory(pgdata: Path, account: _Account | None, bin_dir: Path) -> None:
    pgdata.mkdir(parents=True, exist_ok=True)
    if account is not None:
        for path in (pgdata.parent, bin_dir):
            _ensure_reachable(path, account)
        if pgdata.stat().st_uid != account.uid:
            _chown_tree(pgdata, account)
    # Postgres insists on 0700 (or 0750) for its data directory.
    pgdata.chmod(0o700)


def _ensure_reachable(path: Path, account: _Account) -> None:
    """Give ``account`` search permission on ``path`` and each of its ancestors that denies it."""
    for directory in (path, *path.parents):
        info = directory.stat()
        if info.st_uid == account.uid:
            allowed = bool(info.st_mode & stat.S_IXUSR)
        elif info.st_gid == account.gid:
            allowed = bool(info.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(info.st_mode & stat.S_IXOTH)
        if not allowed:
            log.warning(
                "adding o+x (search, not read) to %s so user %r can reach it", directory, account.name
            )
            directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def _chown_tree(root: Path, account: _Account) -> None:
    log.info("handing %s to user %r", root, account.name)
    os.chown(root, account.uid, account.gid)
    for parent, directories, files in os.walk(root):
        for name in (*directories, *files):
            os.chown(os.path.join(parent, name), account.uid, account.gid, follow_symlinks=False)


def _initdb(pgdata: Path, account: _Account | None, bin_dir: Path) -> None:
    if any(pgdata.iterdir()):
        raise EmbeddedPostgresError(f"{pgdata} is not empty and holds no Postgres cluster; choose another")
    log.info("initialising an embedded Postgres in %s", pgdata)
    args = ["-D", str(pgdata), "-U", _SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale"]
    _run(account, bin_dir / "initdb", args)


def _start_server(pgdata: Path, account: _Account | None, bin_dir: Path) -> EmbeddedPostgres:
    logfile = pgdata / "server.log"
    for attempt in range(1, _BIND_ATTEMPTS + 1):
        port = _free_port()
        offset = logfile.stat().st_size if logfile.exists() else 0
        # TCP on loopback only, and no Unix socket: its default directory may not be writable by us.
        options = f"-c listen_addresses={_HOST} -p {port} -c unix_socket_directories=''"
        args = ["start", "-D", str(pgdata), "-w", "-t", str(_TIMEOUT_S), "-l", str(logfile), "-o", options]
        try:
            _run(account, bin_dir / "pg_ctl", args)
        except EmbeddedPostgresError:
            server_log = _read_from(logfile, offset)
            if "could not bind" in server_log and attempt < _BIND_ATTEMPTS:
                log.info("port %d was taken before Postgres bound it; trying another", port)
                continue
            raise EmbeddedPostgresError(
                f"Postgres did not start on {pgdata}; its log says:\n{server_log}"
            ) from None
        server = _running(pgdata)
        if server is None:
            raise EmbeddedPostgresError(f"pg_ctl reported a start but no server answers on port {port}")
        log.info("started the embedded Postgres on port %d (%s)", port, pgdata)
        return EmbeddedPostgres(pgdata=pgdata, port=server.port, pid=server.pid, started=True)
    raise AssertionError("unreachable")


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _run(account: _Account | None, executable: Path, args: Sequence[str]) -> None:
    """Run a Postgres program, as ``account`` when given, with a clean environment."""
    env = {"PATH": os.defpath, "LC_ALL": "C", "HOME": "/"}
    # Output goes to a file, not a pipe: should a server child inherit the pipe, reading it to EOF
    # would wait for the server to exit.
    with tempfile.TemporaryFile() as output:
        result = subprocess.run(
            [str(executable), *args],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            check=False,
            timeout=_TIMEOUT_S + 30,
            # extra_groups=[]: drop root's supplementary groups along with its uid.
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else [],
        )
        if result.returncode != 0:
            output.seek(0)
            text = output.read().decode(errors="replace").strip()
            raise EmbeddedPostgresError(f"{executable.name} {' '.join(args)} failed:\n{text}")
