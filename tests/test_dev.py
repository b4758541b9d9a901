"""`tianshu dev`: the whole stack from one command, stopped in order, leaving nothing behind.

The command runs as a user runs it, in a process of its own; it starts its own nats-server (on a
free port here) and uses a database of its own (its scheduler's sweeper would adopt other tests'
cases otherwise).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import psutil  # type: ignore[import-untyped]
import pytest

from tests._nats import NatsServer
from tests._services import ROOT, CaseDb, fresh_database, new_key, request_start
from tianshu_contracts import subjects

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]


class Dev:
    """One `tianshu dev` process, its output in a file."""

    def __init__(self, workdir: Path, database_url: str, *args: str) -> None:
        self.out = workdir / "dev.out"
        env = {k: v for k, v in os.environ.items() if k not in ("TIANSHU_NATS_URL", "TIANSHU_DATABASE_URL")}
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tianshu_core.cli",
                    "--database-url",
                    database_url,
                    "dev",
                    "--nats-port",
                    "0",
                    "--data-dir",
                    str(workdir / "dev"),
                    *args,
                ],
                cwd=ROOT,
                env={**env, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 60.0) -> str:
        """The NATS URL it printed once ready."""
        deadline = time.monotonic() + timeout_s
        while (found := re.search(r"tianshu dev: ready\. NATS (\S+),", self.text())) is None:
            assert self.proc.poll() is None, f"tianshu dev exited with {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"tianshu dev not ready:\n{self.text()}"
            time.sleep(0.05)
        return found[1]

    def descendants(self) -> list[psutil.Process]:
        return list(psutil.Process(self.proc.pid).children(recursive=True))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
async def db_url(pg_server_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server_url, "tianshu_dev") as url:
        yield url


@pytest.fixture
def dev(tmp_path: Path, db_url: str) -> Iterator[Dev]:
    made = Dev(tmp_path, db_url, "--workflows", "examples.approval,examples.agent")
    yield made
    made.kill()


def gone(processes: list[psutil.Process], within_s: float) -> list[psutil.Process]:
    """Those of `processes` still alive after `within_s` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=within_s)
    return list(alive)


async def test_dev_runs_the_stack_and_ctrl_c_stops_it_in_order(dev: Dev, db_url: str) -> None:
    url = dev.wait_ready()
    children = dev.descendants()
    names = sorted(" ".join(p.cmdline()[:3]) for p in children)
    # nats, the scheduler, a tool runner, the scripted model server and an LLM gateway
    assert any("nats-server" in n for n in names) and len(children) == 5, names
    nc = await nats.connect(url)
    db = await CaseDb.open(db_url)
    try:
        key = await request_start(nc, "approval", {"title": "Buy GPUs"}, key=new_key("dev"))
        await db.wait_state(key, "waiting", context=dev.text)
        await nc.jetstream().publish(
            subjects.event("review_decision", key), json.dumps({"verdict": "approved"}).encode()
        )
        done = await db.wait_state(key, "finished", context=dev.text)
        assert done["finished_type"] == "approved"
        # The example agent: a tool loop whose model is the gateway, answering from the scripted
        # model server that `tianshu dev` started (it echoes the question).
        agent = await request_start(
            nc, "agent", {"question": "What does storage cost?"}, key=new_key("agent")
        )
        answered = await db.wait_state(agent, "finished", context=dev.text)
        assert answered["output"] == {"answer": "echo: What does storage cost?"}
    finally:
        await nc.close()
        await db.close()
    os.killpg(dev.proc.pid, signal.SIGINT)  # Ctrl-C in its terminal: to its whole process group
    assert dev.proc.wait(60) == 0, dev.text()
    assert gone(children, 10) == []
    out = dev.text()
    assert "drain did not finish" not in out, out  # the services drained before NATS stopped
    assert "Traceback" not in out, out


async def test_a_killed_dev_leaves_no_process_behind(dev: Dev) -> None:
    dev.wait_ready()
    children = dev.descendants()
    assert len(children) == 5
    dev.kill()  # SIGKILL: no chance to stop anything itself
    assert gone(children, 30) == []


async def test_a_service_that_dies_stops_the_stack(dev: Dev) -> None:
    dev.wait_ready()
    scheduler = next(p for p in dev.descendants() if "tianshu_scheduler" in p.cmdline())
    scheduler.kill()
    assert dev.proc.wait(60) == 1
    assert "scheduler exited with -9; stopping" in dev.text()


def test_a_taken_nats_port_is_a_clear_error(tmp_path: Path, nats_server: NatsServer) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tianshu_core.cli",
            "dev",
            "--nats-port",
            str(nats_server.port),
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TIANSHU_NATS_URL"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"port {nats_server.port} is taken" in done.stderr and "Traceback" not in done.stderr


def test_the_compose_stack_wires_the_gateway_to_the_scripted_model_server() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway = compose["services"]["llm-gateway"]
    assert gateway["command"] == ["tianshu-llm-gateway"]
    config = gateway["environment"]["TIANSHU_LLM_GATEWAY_CONFIG"]
    path = ROOT / config.split(":-", 1)[1].rstrip("}").removeprefix("/app/")
    assert path.is_file()
    assert "/etc/nats/tianshu.conf" in compose["services"]["nats"]["command"]
    checked = subprocess.run(
        [sys.executable, "-m", "tianshu_llm_gateway", "--check-config", str(path)],
        env={**os.environ, "TIANSHU_SCRIPTED_KEY": "scripted"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "route default" in checked.stdout and "scripted" not in checked.stdout.split("keys:")[1][:3]
