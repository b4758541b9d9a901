"""Anchor B1 on LangGraph 1.2.22 + AsyncPostgresSaver 3.2.0: checkpointed no-op nodes, throughput.

A linear graph of B1_S no-op nodes, one thread per workflow, B1_C threads at a time, under
bench/loadgen.py's load rule (at least B1_N workflows and at least B1_MIN_SECONDS). Saver made
with `from_conn_string` and default durability, as the shared anchors' lg_bench.py does.
Usage: PYTHONPATH=<repo root> python bench/anchors/langgraph_b1.py  (database URL: BENCH_PG_URL)
Prints one line: 'langgraph steps_per_s=<float>'.
"""

import asyncio
import uuid
from typing import TypedDict

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph

from bench.loadgen import B1Params, drive, info, pg_url


class State(TypedDict):
    t: int


def node(i: int):
    def run(s: State) -> State:
        return {"t": s["t"] + i}

    return run


async def main() -> None:
    params = B1Params.from_env()
    async with AsyncPostgresSaver.from_conn_string(pg_url()) as saver:
        await saver.setup()
        b = StateGraph(State)
        prev = START
        for i in range(params.steps):
            b.add_node(f"n{i}", node(i))
            b.add_edge(prev, f"n{i}")
            prev = f"n{i}"
        b.add_edge(prev, END)
        graph = b.compile(checkpointer=saver)

        async def one() -> None:
            await graph.ainvoke({"t": 0}, {"configurable": {"thread_id": str(uuid.uuid4())}})

        await one()  # warm-up
        run = await drive(one, min_n=params.n, concurrency=params.concurrency, min_seconds=params.min_seconds)
    info(
        f"langgraph: {run.count} workflows x {params.steps} steps, {params.concurrency} at a time, "
        f"in {run.seconds:.2f} s"
    )
    print(f"langgraph steps_per_s={run.rate(params.steps):.1f}", flush=True)


asyncio.run(main())
