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
    url: str | None = None

    def engine(self, registry: WorkflowRegistry, **config: object) -> Engine:
        return Engine(self.stores, registry, clock=self.clock, config=EngineConfig(**config))  # type: ignore[arg-type]


BackendFactory = Callable[[], Backend]


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None for the in-memory backend, else the URL of the migrated test database."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("pg_migrated_url")
    return url


@pytest.fixture
async def backend(backend_url: str | None) -> AsyncIterator[Backend]:
    clock = ManualClock()
    if backend_url is None:
        yield Backend("memory", memory_stores(), clock)
        return
    from tianshu_core import connect_postgres

    stores = await connect_postgres(backend_url, max_size=4)
    try:
        yield Backend("postgres", stores, clock, backend_url)
    finally:
        await stores.close()


@pytest.fixture(scope="session")
async def pg_migrated_url(pg_url: str) -> str:
    from tianshu_core.stores.postgres import migrate

    await migrate(pg_url)
    return pg_url
