"""The `backend` fixture: engine tests run against the in-memory and the Postgres stores alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from tianshu_core import Engine, EngineConfig, ManualClock, Stores, WorkflowRegistry, memory_stores


@dataclass
class Backend:
    """A store backend plus a clock the test can move."""

    name: str
    stores: Stores
    clock: ManualClock

    def engine(self, registry: WorkflowRegistry, **config: object) -> Engine:
        return Engine(self.stores, registry, clock=self.clock, config=EngineConfig(**config))  # type: ignore[arg-type]


BackendFactory = Callable[[], Backend]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = ManualClock()
    if request.param == "memory":
        yield Backend("memory", memory_stores(), clock)
        return
    from tianshu_core import connect_postgres

    url: str = request.getfixturevalue("pg_migrated_url")
    stores = await connect_postgres(url, max_size=4)
    try:
        yield Backend("postgres", stores, clock)
    finally:
        await stores.close()


@pytest.fixture(scope="session")
async def pg_migrated_url(pg_url: str) -> str:
    from tianshu_core.stores.postgres import migrate

    await migrate(pg_url)
    return pg_url
