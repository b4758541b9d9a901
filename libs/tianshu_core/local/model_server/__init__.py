"""A scripted model server: a stand-in for the OpenAI and Anthropic APIs, over real HTTP and SSE.

The test suite points the real `openai` and `anthropic` SDKs at it (and `tianshu dev` can too):

    async with ModelServer() as server:
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test")
        client = anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key="sk-test")

`python -m tianshu_core.local.model_server --port 0` serves until Ctrl-C. Endpoints:
`POST /v1/chat/completions` (OpenAI), `POST /v1/messages` (Anthropic), `GET /v1/models`,
`GET /_stats` (the `Stats` as JSON) and `POST /_reset`. A model request without an API key
(`Authorization: Bearer K`; for Anthropic `x-api-key: K`) gets a 401.

The behaviour language
----------------------
What a request gets is a SCRIPT: the `x-scripted-behaviour` header if present, else the model
name. A model name whose first step is not a step name below (`gpt-4o`) is the script `text`; a
header, or a model name that starts with a step name, must parse, or the answer is a 400.

    script  = step ("+" step)*
    step    = name [":" arg] ("," option "=" value)*

The server counts requests per (api, script text): request n (1-based) runs step min(n, steps),
so `error:429+text` answers a 429 and then text forever. `reset()` starts every count over.

Steps:
- `text`: "echo: " + the text of the last user message (Anthropic: the last user turn that has
  text, not only tool results), finish `stop` / `end_turn`.
- `tools[:N]` (N=1): N tool calls in one reply, of the offered tools in order, cycling (a tool
  named `tool` if none is offered); ids `call_1..N` / `toolu_1..N`; arguments `{"n": k}` (left
  out only if the schema forbids other properties and has no `n`) plus a value for each required
  property: `"v{k}"` for a string, its first `enum` value, k for a number, true, [] or {}.
  Finish `tool_calls` / `tool_use`. Streamed, each call's arguments come in 3 chunks; OpenAI's
  deltas of several calls are interleaved by index. `say=` adds a text before the calls.
- `length[:N]` (N=50): the text `w1 w2 ... wN`. Every text reply (`text` too) is cut to the
  request's max_tokens (`max_completion_tokens` or `max_tokens`) words, finish `length` /
  `max_tokens`; with enough max_tokens it is whole, finish `stop` / `end_turn`.
- `error:STATUS`: that HTTP error in the vendor's body, options `retry_after=S` (the
  `Retry-After` header), `retry_after_ms=MS` (`retry-after-ms`), `type=T` (OpenAI: its error type
  and code, e.g. `type=insufficient_quota`; Anthropic: its error type), `message=WORDS`. Defaults:
  OpenAI 429 `rate_limit_exceeded`, 400 `invalid_request_error`, 5xx `server_error`; Anthropic 429
  `rate_limit_error`, 529 `overloaded_error`, 5xx `api_error`, 400 `invalid_request_error`, 403
  `permission_error`. A 401 (`invalid_api_key` / `authentication_error`) quotes the WHOLE key it
  was sent in its message, as OpenAI does, so tests can check that clients redact it.
- `too_long`: the vendor's prompt-too-long 400 (OpenAI `context_length_exceeded`, "This model's
  maximum context length is M tokens. However, your messages resulted in N tokens..."; Anthropic
  `invalid_request_error`, "prompt is too long: N tokens > M maximum"). M is the context budget,
  else 8192; N is the prompt's tokens, at least M+1.
- `sse_error[:K]` (K=1): a 200 stream of K text deltas, then an in-band error (OpenAI
  `data: {"error": {..., "type": "server_error"}}`, Anthropic `event: error` with
  `overloaded_error`; `type=` and `message=` change them; OpenAI's `shape=event` sends
  `event: error` with the error object bare instead). Not streamed: a 500.
- `cut[:K]` (K=1): a 200 stream of K text deltas, then the connection drops mid-body (no
  `[DONE]`, no finish, no message_stop). Not streamed: the connection drops with no answer.
- `no_finish`: the text reply, whose stream ends cleanly but without a finish reason (OpenAI:
  no finish chunk, still `[DONE]`; Anthropic: no message_delta, no message_stop).
- `badkey:K1|K2`: `text`, but a 401 (quoting the key) for those keys.

Options on any step:
- `deny=K1|K2`: a 401 (quoting the key) for those keys; other keys get the step.
- `delay=S`: wait S seconds before answering; `gap=S`: wait S seconds between stream events.
- `ctx=M`: a context budget of M tokens (the server's `context_tokens` is the default): a longer
  prompt gets `too_long`, whatever the step.
- `cache=R:W`: report R cache-read and W cache-write input tokens on top of the prompt's: OpenAI
  `prompt_tokens` includes them and `prompt_tokens_details.cached_tokens` = R; Anthropic
  `input_tokens` leaves them out, `cache_read_input_tokens` = R, `cache_creation_input_tokens` = W.
- `say=WORDS` (or `text=WORDS`): the reply's text instead of the echo.

Text in option values (`say`, `message`): `_` is a space and `%XX` any byte, as in a URL:
`say=hello_world` is "hello world", `say=a%2Bb%2C_c%5Fd` is "a+b, c_d". Keys in `deny` and
`badkey` are taken as they are (they may not hold `+`, `,` or `|`).

Tokens are words: a prompt's tokens are the whitespace-separated words of its system prompt and
message texts (tool results included) and of its tool calls' names and argument JSON; a reply's
are the words of its text plus, per tool call, the words of its name and argument JSON. Usage
reports these; the stats record every request (`Stats`), with a SHA-256 prefix of its API key
(`key_fingerprint`), never the key, and the request body as sent (where the request's own key
appears in it or in the script, as in `deny=`, the record has `[redacted]` instead).
"""

from ._script import ScriptError, parse_script
from ._server import SCRIPT_HEADER, ModelServer
from ._stats import RequestRecord, Stats, key_fingerprint

__all__ = [
    "SCRIPT_HEADER",
    "ModelServer",
    "RequestRecord",
    "ScriptError",
    "Stats",
    "key_fingerprint",
    "parse_script",
]
