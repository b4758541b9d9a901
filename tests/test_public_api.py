"""The curated public API is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import tianshu_core

EXPECTED = {
    "AnthropicProvider",
    "BaseTool",
    "BaseWorkflow",
    "Case",
    "CaseExistsError",
    "CaseFilter",
    "CaseInterruptedError",
    "CaseNotFoundError",
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
    "Finished",
    "InvalidTokenError",
    "JournalEntry",
    "JournalKind",
    "JournalStore",
    "Lease",
    "LeaseLostError",
    "LeaseStore",
    "Lifecycle",
    "LlmMessage",
    "LlmAttempt",
    "LlmCallPending",
    "LlmError",
    "LlmErrorClass",
    "LlmInvocation",
    "LlmProvider",
    "LlmRequest",
    "LlmResponse",
    "LocalToolExecutor",
    "ManualClock",
    "MigrationError",
    "Next",
    "NonDeterminismError",
    "PayloadTooLargeError",
    "PollPredicate",
    "PublishReceipt",
    "PublishResult",
    "RequestRefusedError",
    "ResourceFetcher",
    "RetryPolicy",
    "RunReport",
    "RunStatus",
    "SchedulerUnavailableError",
    "OpenAiProvider",
    "ResiliencePolicy",
    "ResilientLlmProvider",
    "ScriptedLlm",
    "Session",
    "SessionStateEntry",
    "SessionStore",
    "SpawnConfig",
    "StageOutcome",
    "StateEntry",
    "StateStore",
    "StepResultNotSerializableError",
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
    "Usage",
    "UnknownWorkflowError",
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
}


def test_public_exports_are_pinned() -> None:
    assert set(tianshu_core.__all__) == EXPECTED


def test_every_export_exists_and_is_documented() -> None:
    for name in tianshu_core.__all__:
        obj = getattr(tianshu_core, name)
        if callable(obj) and not isinstance(obj, type(tianshu_core)):
            assert getattr(obj, "__doc__", None), f"{name} has no docstring"


def test_errors_share_one_root_with_stable_codes() -> None:
    errors = [getattr(tianshu_core, n) for n in tianshu_core.__all__ if n.endswith("Error")]
    codes = [e.code for e in errors if issubclass(e, tianshu_core.TianshuError)]
    assert all(issubclass(e, tianshu_core.TianshuError) for e in errors)
    assert len(codes) == len(set(codes))
