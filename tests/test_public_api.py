"""The curated public API is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import subprocess
import sys

import tianshu_core

EXPECTED = {
    "AnthropicProvider",
    "BaseTool",
    "BaseWorkflow",
    "Case",
    "CaseExistsError",
    "CaseCursor",
    "CaseFilter",
    "CasePage",
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
    "UnstorableValueError",
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


def test_the_engine_client_and_services_do_not_import_the_local_tooling() -> None:
    """`tianshu_core.local` (embedded Postgres, `tianshu dev`, the scripted model server) is for one
    machine; an application or a service that imports the engine must not load it."""
    modules = [
        "tianshu_core",
        "tianshu_core.engine",
        "tianshu_core.driver",
        "tianshu_core.client",
        "tianshu_core.stores.postgres",
        "tianshu_scheduler.__main__",
        "tianshu_scheduler.service",
        "tianshu_tool_runner.__main__",
        "tianshu_tool_runner.service",
        "tianshu_llm_gateway.__main__",
        "tianshu_llm_gateway.service",
    ]
    # After the check, the tooling itself: the same probe must see it (a misspelt prefix would not).
    code = (
        "import importlib, sys\n"
        "def loaded():\n"
        "    return sorted(m for m in sys.modules if m.startswith('tianshu_core.local') or m == 'pgserver')\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(loaded())\n"
        "import tianshu_core.local.embedded\n"
        "print(loaded())\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    engine_side, tooling_side = found.stdout.splitlines()
    assert engine_side == "[]"
    assert "tianshu_core.local.embedded" in tooling_side
