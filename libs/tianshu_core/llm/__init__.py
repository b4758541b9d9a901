"""Models: the `LlmProvider` protocol, the vendor providers, and the resilience around them.

- `LlmProvider`: `complete` and `stream`, each with an optional `LlmInvocation` (case, record and
  a `call_id` stable across replays); `LlmCallPending` parks a case until a remote answer comes;
- `ScriptedLlm`: answers from a script, for tests and docs;
- `LlmError` with an `LlmErrorClass`, never holding an API key (`redact`);
- `OpenAiProvider` (any OpenAI-compatible API) and `AnthropicProvider`, on the vendors' SDKs
  (`SdkProvider`: API keys tried in turn, a concurrency limit, classified errors, spans);
- `ResilientLlmProvider`: one retry loop and a fallback chain (`ResiliencePolicy`).

The LLM types themselves are contracts (`tianshu_contracts.llm`), re-exported by `tianshu_core`.
"""

from typing import TYPE_CHECKING, Any

from ._errors import REDACTED, LlmError, redact
from ._provider import (
    LLM_RESULT_RESOURCE,
    LlmCallPending,
    LlmInvocation,
    LlmProvider,
    collect,
    events_of,
    takes_invocation,
)
from ._resilient import ResiliencePolicy, ResilientLlmProvider, estimate_tokens
from ._scripted import ScriptedLlm
from ._sdk import SdkProvider

if TYPE_CHECKING:
    from ._anthropic import AnthropicProvider
    from ._openai import OpenAiProvider

# The vendor SDKs take seconds to import on a busy machine: loaded when a provider is first named.
_SDK_PROVIDERS = {"AnthropicProvider": "._anthropic", "OpenAiProvider": "._openai"}


def __getattr__(name: str) -> Any:
    if name in _SDK_PROVIDERS:
        import importlib

        return getattr(importlib.import_module(_SDK_PROVIDERS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LLM_RESULT_RESOURCE",
    "REDACTED",
    "AnthropicProvider",
    "LlmCallPending",
    "LlmError",
    "LlmInvocation",
    "LlmProvider",
    "OpenAiProvider",
    "ResiliencePolicy",
    "ResilientLlmProvider",
    "ScriptedLlm",
    "SdkProvider",
    "collect",
    "estimate_tokens",
    "events_of",
    "redact",
    "takes_invocation",
]
