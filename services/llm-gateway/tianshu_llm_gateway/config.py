"""The providers file: the upstream providers the gateway calls (and with which keys), the models
they serve, and the routes workflows ask for.

    providers:
      - name: openai
        kind: openai                       # openai | anthropic
        base_url: https://api.openai.com/v1  # optional
        api_key_env: [OPENAI_API_KEY]      # environment variables holding a key each (a name or a list)
        api_key_file: []                   # or files holding a key each (container secrets)
        max_concurrency: 16                # optional: calls in flight to this provider, all its models
        timeout_s: 120                     # optional
    models:
      - name: gpt-4o-mini                  # what routes name
        provider: openai
        upstream: gpt-4o-mini              # the vendor's model name (default: name)
        context_window: 128000             # optional
        prices: {input: 0.15, output: 0.60, cached_input: 0.075, cache_write: 0.0}  # USD per 1M tokens
    routes:
      - name: smart                        # what a workflow asks for (LlmRequest.model)
        chain: [claude-sonnet, gpt-4o-mini]
        policy: {max_attempts: 4, cooldown_s: 5}  # any ResiliencePolicy field, optional

Keys are never written in the file: a field named like a secret (`api_key`, `token`, `password`...)
or a value shaped like a key is refused, and no error or dump ever shows one. Keys are read from
the environment and the key files when the gateway starts (`GatewayConfig.resolve_keys`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from tianshu_contracts.llm import Usage
from tianshu_core import TianshuError
from tianshu_core.llm import (
    REDACTED,
    AnthropicProvider,
    OpenAiProvider,
    ResiliencePolicy,
    SdkProvider,
    redact,
)

from .routes import ChainEntry, RecordedProvider, Route

# The SDK providers' own default (tianshu_core.llm's DEFAULT_TIMEOUT_S).
DEFAULT_TIMEOUT_S = 120.0
# A field whose name says it holds a secret; `api_key_env`/`api_key_file` only name where one is.
_SECRET_FIELD = re.compile(r"(^|[_-])(api[_-]?key|apikey|keys?|token|secret|password|passwd)($|[_-])", re.I)
_REFERENCE_FIELD = re.compile(r"[_-](env|file)$", re.I)


class GatewayConfigError(TianshuError):
    """The providers file cannot be used: unreadable, not valid, or a key it names is missing."""

    code = "invalid_gateway_config"


def _listed(value: Any) -> Any:
    """One name given alone stands for a list of one."""
    return [value] if isinstance(value, str) else value


Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^\S+$")]
EnvName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    """One upstream account: its API (`kind`), where it is, its keys and its limits."""

    name: Name
    kind: Literal["openai", "anthropic"]
    base_url: str | None = Field(default=None, min_length=1)
    api_key_env: Annotated[list[EnvName], BeforeValidator(_listed)] = Field(default_factory=list)
    api_key_file: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_listed)] = Field(
        default_factory=list
    )
    max_concurrency: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)

    @model_validator(mode="after")
    def _has_keys(self) -> ProviderConfig:
        if not self.api_key_env and not self.api_key_file:
            raise ValueError(f"provider {self.name!r} names no key: give api_key_env or api_key_file")
        return self


class Prices(_Strict):
    """USD per million tokens; cached input and cache writes cost `input` unless priced apart."""

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)

    def cost(self, usage: Usage) -> float:
        """What `usage` cost: uncached input, cache reads, cache writes and output at their prices."""
        read, written = usage.cache_read_tokens, usage.cache_write_tokens
        fresh = max(0, usage.prompt_tokens - read - written)
        cached = self.input if self.cached_input is None else self.cached_input
        writing = self.input if self.cache_write is None else self.cache_write
        total = fresh * self.input + read * cached + written * writing + usage.completion_tokens * self.output
        return total / 1_000_000


class ModelConfig(_Strict):
    """A model of a provider, under the name routes use."""

    name: Name
    provider: Name
    upstream: str | None = Field(default=None, min_length=1, max_length=200)
    context_window: int | None = Field(default=None, gt=0)
    prices: Prices | None = None

    @property
    def upstream_name(self) -> str:
        """The vendor's name of the model."""
        return self.upstream or self.name


class RouteConfig(_Strict):
    """What a workflow asks for: models tried in order, with one retry policy."""

    name: Name
    chain: list[Name] = Field(min_length=1)
    policy: ResiliencePolicy | None = None


class GatewayConfig(_Strict):
    """A loaded providers file (see the module's docstring); `build()` makes its routes."""

    providers: list[ProviderConfig] = Field(min_length=1)
    models: list[ModelConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    _source: Path = PrivateAttr(default=Path("<config>"))

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        for section in ("providers", "models", "routes"):
            names = [item.name for item in getattr(self, section)]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{section}: {', '.join(twice)} named more than once")
        providers = {p.name for p in self.providers}
        for i, model in enumerate(self.models):
            if model.provider not in providers:
                raise ValueError(
                    f"models[{i}] ({model.name}): no provider {model.provider!r}; "
                    f"providers: {', '.join(sorted(providers))}"
                )
        models = {m.name: m for m in self.models}
        for i, route in enumerate(self.routes):
            unknown = [m for m in route.chain if m not in models]
            if unknown:
                known = ", ".join(sorted(models))
                raise ValueError(f"routes[{i}] ({route.name}): no model {unknown[0]!r}; models: {known}")
            upstreams = [(models[m].provider, models[m].upstream_name) for m in route.chain]
            if len(set(upstreams)) < len(upstreams):
                raise ValueError(
                    f"routes[{i}] ({route.name}): its chain names one upstream model of one provider twice"
                )
        return self

    @property
    def source(self) -> Path:
        """The file it was loaded from."""
        return self._source

    def provider(self, name: str) -> ProviderConfig:
        return next(p for p in self.providers if p.name == name)

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    def _used_providers(self) -> list[ProviderConfig]:
        used = {self.model(m).provider for route in self.routes for m in route.chain}
        return [p for p in self.providers if p.name in used]

    # -- keys -----------------------------------------------------------------------------------

    def _key_file(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self._source.parent / path

    def resolve_keys(self) -> dict[str, list[str]]:
        """Every key of every provider a route uses, by provider name; `GatewayConfigError` naming
        the variable or file (never a value) when one is missing, unreadable or empty."""
        keys: dict[str, list[str]] = {}
        for provider in self._used_providers():
            where = f"{self._source}: provider {provider.name}"
            found: list[str] = []
            for variable in provider.api_key_env:
                value = os.environ.get(variable, "").strip()
                if not value:
                    raise GatewayConfigError(f"{where}: the environment variable {variable} is not set")
                found.append(value)
            for name in provider.api_key_file:
                path = self._key_file(name)
                try:
                    value = path.read_text().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                    raise GatewayConfigError(f"{where}: cannot read the key file {path}: {why}") from None
                if not value:
                    raise GatewayConfigError(f"{where}: the key file {path} is empty")
                found.append(value)
            keys[provider.name] = found
        return keys

    # -- routes ---------------------------------------------------------------------------------

    def build(self) -> dict[str, Route]:
        """The routes by name: each a `ResilientLlmProvider` over one SDK provider per chain entry.

        One SDK provider is made per model (its `model` is the upstream name) and shared by every
        route that names it; the models of one provider share its keys, its settings and its
        `max_concurrency`.
        """
        keys = self.resolve_keys()
        made: dict[str, SdkProvider[Any]] = {}
        for name in dict.fromkeys(m for route in self.routes for m in route.chain):
            made[name] = self._sdk_provider(self.model(name), keys, made)
        routes: dict[str, Route] = {}
        for route in self.routes:
            entries = []
            for name in route.chain:
                model = self.model(name)
                entries.append(ChainEntry(name, model.provider, model.upstream_name, model.prices))
            routes[route.name] = Route(
                route.name,
                [RecordedProvider(made[name]) for name in route.chain],
                entries,
                route.policy or ResiliencePolicy(),
            )
        return routes

    def _sdk_provider(
        self, model: ModelConfig, keys: dict[str, list[str]], made: dict[str, SdkProvider[Any]]
    ) -> SdkProvider[Any]:
        provider = self.provider(model.provider)
        kind = OpenAiProvider if provider.kind == "openai" else AnthropicProvider
        # One limit for the provider, shared by its models' SDK providers.
        sibling = next((p for p in made.values() if p.name == provider.name), None)
        shared = sibling.limit if sibling is not None else None
        return kind(
            name=provider.name,
            api_keys=keys[provider.name],
            base_url=provider.base_url,
            model=model.upstream_name,
            max_concurrency=None if shared is not None else provider.max_concurrency,
            limit=shared,
            timeout_s=provider.timeout_s,
            context_window=model.context_window,
        )

    # -- the dump -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The routes as they resolve, as JSON values; keys appear as counts and names, never values."""
        providers = []
        for provider in self.providers:
            env = [{"name": v, "set": bool(os.environ.get(v, "").strip())} for v in provider.api_key_env]
            files = [
                {"path": str(self._key_file(f)), "readable": _readable(self._key_file(f))}
                for f in provider.api_key_file
            ]
            providers.append(
                {
                    "name": provider.name,
                    "kind": provider.kind,
                    "base_url": _masked_url(provider.base_url) if provider.base_url else None,
                    "api_key_env": env,
                    "api_key_file": files,
                    "keys": sum(1 for e in env if e["set"]) + sum(1 for f in files if f["readable"]),
                    "max_concurrency": provider.max_concurrency,
                    "timeout_s": provider.timeout_s,
                }
            )
        routes = []
        for route in self.routes:
            chain = []
            for name in route.chain:
                model = self.model(name)
                chain.append(
                    {
                        "model": model.name,
                        "provider": model.provider,
                        "upstream": model.upstream_name,
                        "context_window": model.context_window,
                        "prices": model.prices.model_dump() if model.prices else None,
                    }
                )
            policy = route.policy or ResiliencePolicy()
            routes.append({"name": route.name, "chain": chain, "policy": _policy_json(policy)})
        return {"config": str(self._source), "providers": providers, "routes": routes}

    def dump(self, *, as_json: bool = False) -> str:
        """`describe()` as indented JSON, or as text for people."""
        described = self.describe()
        if as_json:
            return json.dumps(described, indent=2)
        return "\n".join(_text(described))


def _readable(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def _masked_url(url: str) -> str:
    """A URL without its user, password and query (where a key could hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    if parts.username or parts.password:
        netloc = f"{REDACTED}@{netloc}"
    return urlunsplit(parts._replace(netloc=netloc, query=REDACTED if parts.query else ""))


def _policy_json(policy: ResiliencePolicy) -> dict[str, Any]:
    fields = {name: getattr(policy, name) for name in policy.__dataclass_fields__}
    fields["retry_statuses"] = sorted(policy.retry_statuses)
    return fields


def _text(described: dict[str, Any]) -> Iterator[str]:
    providers = {p["name"]: p for p in described["providers"]}
    yield f"providers file: {described['config']}"
    for route in described["routes"]:
        policy = ", ".join(f"{k}={v}" for k, v in route["policy"].items())
        yield f"route {route['name']}  (policy: {policy})"
        for n, entry in enumerate(route["chain"], 1):
            window = f", context window {entry['context_window']}" if entry["context_window"] else ""
            prices = entry["prices"]
            priced = (
                ", prices per 1M tokens: " + ", ".join(f"{k} {v}" for k, v in prices.items() if v is not None)
                if prices
                else ", no prices"
            )
            yield f"  {n}. {entry['model']}: {entry['upstream']} at {entry['provider']}{window}{priced}"
    yield "providers:"
    for provider in providers.values():
        url = provider["base_url"] or "(the SDK's default URL)"
        yield f"  {provider['name']} ({provider['kind']}) {url}, timeout {provider['timeout_s']} s" + (
            f", at most {provider['max_concurrency']} calls at once" if provider["max_concurrency"] else ""
        )
        sources = [f"env {e['name']}: {'set' if e['set'] else 'NOT SET'}" for e in provider["api_key_env"]]
        sources += [
            f"file {f['path']}: {'readable' if f['readable'] else 'NOT READABLE'}"
            for f in provider["api_key_file"]
        ]
        yield f"    keys: {provider['keys']} ({'; '.join(sources)})"


# -- loading --------------------------------------------------------------------------------------


def load_config(path: str | Path) -> GatewayConfig:
    """Read and check a providers file; `GatewayConfigError` (one line, naming the file and the
    place, never a secret's value) when it cannot be used."""
    source = Path(path).expanduser()
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise GatewayConfigError(f"{source}: cannot read the providers file: {why}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GatewayConfigError(f"{source}: not valid YAML{_yaml_where(exc)}") from None
    if not isinstance(data, dict):
        raise GatewayConfigError(f"{source}: expected a mapping with providers, models and routes")
    secret = _written_secret(data)
    if secret is not None:
        raise GatewayConfigError(
            f"{source}: {secret}: a key written in the providers file is refused; name the environment "
            "variable (api_key_env) or the file (api_key_file) that holds it"
        )
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise GatewayConfigError(f"{source}: {_problems(exc)}") from None
    config._source = source.resolve()
    return config


def _yaml_where(exc: yaml.YAMLError) -> str:
    """Where and what, without the excerpt of the file PyYAML quotes (it could hold a key)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}" if problem else where


def _place(loc: tuple[str | int, ...]) -> str:
    place = ""
    for part in loc:
        place += f"[{part}]" if isinstance(part, int) else f".{part}" if place else str(part)
    return place


def _written_secret(value: Any, loc: tuple[str | int, ...] = ()) -> str | None:
    """The place of the first secret written in the file: a secret-named field with a value, or a
    string shaped like an API key."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = (*loc, str(key))
            named = _SECRET_FIELD.search(str(key)) and not _REFERENCE_FIELD.search(str(key))
            if named and item not in (None, "", [], {}):
                return _place(here)
            found = _written_secret(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _written_secret(item, (*loc, i))
            if found is not None:
                return found
    elif isinstance(value, str) and redact(value) != value:
        return f"{_place(loc)} (a value shaped like an API key)"
    return None


def _problems(exc: ValidationError) -> str:
    """A validation error on one line: each problem's place and message, never the input value."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:5]:
        message = err["msg"].removeprefix("Value error, ")
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        problems.append(f"{_place(loc)}: {message}" if loc else message)
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(problems) + more
