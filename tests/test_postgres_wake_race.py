"""No lost wake-up: a case that stores its wait while a publish on the same resource is in flight
looks once more after that publish commits (`next_after(..., settled=True)`)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tianshu_core import connect_postgres

pytestmark = pytest.mark.postgres


async def test_a_settled_look_waits_for_an_in_flight_publish(pg_migrated_url: str) -> None:
    resource = f"race-{uuid.uuid4().hex[:8]}"
    since = datetime.now(UTC) - timedelta(minutes=1)
    stores = await connect_postgres(pg_migrated_url, max_size=2)
    publisher = await asyncpg.connect(pg_migrated_url)
    try:
        publishing = publisher.transaction()
        await publishing.start()
        # A publish-and-wake in flight: its event is stored but not committed, its lock held.
        await publisher.fetchrow(
            "SELECT * FROM tianshu_publish_wake_take("
            "'order', $1, '{\"n\": 1}'::jsonb, NULL, $2, $3, 'me', 30, 8)",
            resource,
            datetime.now(UTC),
            since,
        )
        plain = await stores.events.next_after("order", resource, after_seq=0, not_before=since)
        assert plain is None  # an ordinary look cannot see it yet: the race the settled look closes
        settled = asyncio.create_task(
            stores.events.next_after("order", resource, after_seq=0, not_before=since, settled=True)
        )
        await asyncio.sleep(0.2)
        assert not settled.done()  # it waits for the publish to commit ...
        await publishing.commit()
        event = await asyncio.wait_for(settled, 10)
        assert event is not None and event.payload == {"n": 1}  # ... and then sees its event
    finally:
        await publisher.close()
        await stores.close()
