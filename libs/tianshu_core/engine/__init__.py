"""The engine: "run a case once" and the library-mode driver around it.

run once = take the case's lease (fencing token), load its journal, replay the workflow,
execute what is new, persist the outcome and its waits, release. The tick and the service-mode
driver (`tianshu_core.driver.ServiceDriver`, which the scheduler service runs) are two drivers of
it.

By concept: `_run` (the heart, `CaseRunner`), `_engine` (`Engine`: creating cases, events, the
library-mode driver, operating on cases), `_lease` (`LeaseKeeper`), `_config` (`EngineConfig`)
and `_types` (what the calls take and return).
"""

from ._config import EngineConfig, ExecutionMode
from ._engine import Engine
from ._lease import LeaseKeeper
from ._run import CaseRunner
from ._types import (
    CaseListener,
    CaseRun,
    PublishResult,
    ResourceFetcher,
    RunReport,
    RunStatus,
    TickOutcome,
    WakeListener,
    waiting_on,
)

__all__ = [
    "CaseListener",
    "CaseRun",
    "CaseRunner",
    "Engine",
    "EngineConfig",
    "ExecutionMode",
    "LeaseKeeper",
    "PublishResult",
    "ResourceFetcher",
    "RunReport",
    "RunStatus",
    "TickOutcome",
    "WakeListener",
    "waiting_on",
]
