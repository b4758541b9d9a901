"""Tianshu: a durable workflow engine for AI agents.

A workflow is ordinary sequential async code; every `ctx.step()` is checkpointed, so a crashed
process resumes at the last completed step, and a waiting case costs a row, not a coroutine.
"""

from typing import TYPE_CHECKING, Any

from tianshu_contracts.llm import (
    LlmAttempt,
    LlmErrorClass,
    LlmMessage,
    LlmRequest,
    LlmResponse,
    ToolCall,
    ToolResult,
    ToolSpec,
    Usage,
)

from .clock import Clock, ManualClock, SystemClock
from .context import (
    ChildHandle,
    ChildOutcome,
    Next,
    SpawnConfig,
    StageOutcome,
    WaitTimeoutError,
    WorkflowContext,
)
from .engine import (
    Engine,
    EngineConfig,
    ExecutionMode,
    PublishResult,
    ResourceFetcher,
    RunReport,
    RunStatus,
    TickOutcome,
)
from .errors import (
    CaseExistsError,
    CaseInterruptedError,
    CaseNotFoundError,
    CorruptCheckpointError,
    DuplicateStepError,
    DuplicateWorkflowError,
    ErrorInfo,
    FatalStepError,
    InvalidCursorError,
    InvalidTokenError,
    LeaseLostError,
    MigrationError,
    NonDeterminismError,
    PayloadTooLargeError,
    StepResultTooLargeError,
    StoreUnavailableError,
    TianshuError,
    UnknownWorkflowError,
    UnstorableValueError,
)
from .llm import (
    LlmCallPending,
    LlmError,
    LlmInvocation,
    LlmProvider,
    ResiliencePolicy,
    ResilientLlmProvider,
    ScriptedLlm,
)
from .models import (
    Case,
    CaseCursor,
    CaseFilter,
    CasePage,
    Event,
    ExecutionState,
    Fence,
    JournalEntry,
    JournalKind,
    Lease,
    Lifecycle,
    PollPredicate,
    Session,
    SessionStateEntry,
    StateEntry,
    Timer,
)
from .results import Continue, Finished, Waiting, WorkflowResult
from .retry import ErrorClass, RetryPolicy
from .stores.memory import memory_stores
from .stores.protocols import (
    CaseStore,
    EventStore,
    JournalStore,
    LeaseStore,
    SessionStore,
    StateStore,
    Stores,
    TimerStore,
    WaitStore,
)
from .tokens import decode_token, encode_token
from .tools import (
    BaseTool,
    LocalToolExecutor,
    Tool,
    ToolDefinitionError,
    ToolExecutor,
    ToolInvocation,
    ToolLoopConfig,
    ToolLoopMaxRoundsError,
    ToolRegistry,
    ToolSafety,
    Toolset,
    tool,
)
from .workflow import BaseWorkflow, WorkflowRegistry, default_registry, workflow

if TYPE_CHECKING:
    from .client import (
        CaseWaitTimeoutError,
        PublishReceipt,
        RequestRefusedError,
        SchedulerUnavailableError,
        TianshuClient,
    )
    from .llm import AnthropicProvider, OpenAiProvider

# The client needs nats-py and the bus; imported on first use, so that `import tianshu_core` for
# the engine alone stays free of them.
_CLIENT_NAMES = frozenset(
    {
        "CaseWaitTimeoutError",
        "PublishReceipt",
        "RequestRefusedError",
        "SchedulerUnavailableError",
        "TianshuClient",
    }
)


# The vendor providers, imported on first use with their SDKs (see `tianshu_core.llm`).
_PROVIDER_NAMES = frozenset({"AnthropicProvider", "OpenAiProvider"})


def __getattr__(name: str) -> Any:
    """The client's names and the vendor providers, imported on first use."""
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    if name in _PROVIDER_NAMES:
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _CLIENT_NAMES | _PROVIDER_NAMES)


async def connect_postgres(
    dsn: str, *, min_size: int = 1, max_size: int = 10, migrate: bool = False
) -> Stores:
    """The Postgres backend (asyncpg). With `migrate=True` the schema is brought up to date first."""
    from .stores.postgres import connect_postgres as _connect

    return await _connect(dsn, min_size=min_size, max_size=max_size, migrate=migrate)


__all__ = [
    "AnthropicProvider",
    "BaseTool",
    "BaseWorkflow",
    "Case",
    "CaseCursor",
    "CaseExistsError",
    "CaseFilter",
    "CaseInterruptedError",
    "CaseNotFoundError",
    "CasePage",
    "CaseStore",
    "CaseWaitTimeoutError",
    "ChildHandle",
    "ChildOutcome",
    "Clock",
    "Continue",
    "CorruptCheckpointError",
    "DuplicateStepError",
    "DuplicateWorkflowError",
    "Engine",
    "EngineConfig",
    "ErrorClass",
    "ErrorInfo",
    "Event",
    "EventStore",
    "ExecutionMode",
    "ExecutionState",
    "FatalStepError",
    "Fence",
    "Finished",
    "InvalidCursorError",
    "InvalidTokenError",
    "JournalEntry",
    "JournalKind",
    "JournalStore",
    "Lease",
    "LeaseLostError",
    "LeaseStore",
    "Lifecycle",
    "LlmAttempt",
    "LlmCallPending",
    "LlmError",
    "LlmErrorClass",
    "LlmInvocation",
    "LlmMessage",
    "LlmProvider",
    "LlmRequest",
    "LlmResponse",
    "LocalToolExecutor",
    "ManualClock",
    "MigrationError",
    "Next",
    "NonDeterminismError",
    "OpenAiProvider",
    "PayloadTooLargeError",
    "PollPredicate",
    "PublishReceipt",
    "PublishResult",
    "RequestRefusedError",
    "ResiliencePolicy",
    "ResilientLlmProvider",
    "ResourceFetcher",
    "RetryPolicy",
    "RunReport",
    "RunStatus",
    "SchedulerUnavailableError",
    "ScriptedLlm",
    "Session",
    "SessionStateEntry",
    "SessionStore",
    "SpawnConfig",
    "StageOutcome",
    "StateEntry",
    "StateStore",
    "StepResultTooLargeError",
    "StoreUnavailableError",
    "Stores",
    "SystemClock",
    "TianshuClient",
    "TianshuError",
    "TickOutcome",
    "Timer",
    "TimerStore",
    "Tool",
    "ToolCall",
    "ToolDefinitionError",
    "ToolExecutor",
    "ToolInvocation",
    "ToolLoopConfig",
    "ToolLoopMaxRoundsError",
    "ToolRegistry",
    "ToolResult",
    "ToolSafety",
    "ToolSpec",
    "Toolset",
    "UnknownWorkflowError",
    "UnstorableValueError",
    "Usage",
    "WaitStore",
    "WaitTimeoutError",
    "Waiting",
    "WorkflowContext",
    "WorkflowRegistry",
    "WorkflowResult",
    "connect_postgres",
    "decode_token",
    "default_registry",
    "encode_token",
    "memory_stores",
    "tool",
    "workflow",
]
