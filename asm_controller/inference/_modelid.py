"""A model id names a provider and, optionally, that provider's model: ``claude``, ``claude:sonnet``,
``codex:gpt-5-codex``, ``gemini:gemini-2.5-flash``.

ASM resolved the provider with ``Provider.resolve`` (aliases allowed: ``codex_exec`` is ``codex``) and
refused an unknown one as ``unsupported_provider``, and a lease without a model as
``missing_model_identity``. On the fleet endpoint a bare provider is fine (the CLI's default model); on
a lease the model is required, as in ASM.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Final

from asm_controller.inference._errors import InferenceError
from asm_node.providers import provider_class, provider_names


class _RegisteredProviders(Collection[str]):
    """The provider registry's names, read at each use: a provider registered after import (a plugin, a
    test's fixture) is a model id's provider too, with no second list to keep in step."""

    def __contains__(self, name: object) -> bool:
        return name in provider_names()

    def __iter__(self) -> Iterator[str]:
        return iter(provider_names())

    def __len__(self) -> int:
        return len(provider_names())

    def __repr__(self) -> str:
        return f"PROVIDERS{provider_names()!r}"


#: The providers a model id may name: every registered one (asm_node.providers.REGISTRY). None is left
#: out: each is a CLI run on a node like any other run, and the one that takes a command line, not a
#: transcript (shell), gets its prompt bare (_prompt.BARE_PROMPT_PROVIDERS). Which of them the fleet
#: offers right now is the caller's ``providers`` (``/v1/models`` lists the nodes' available ones).
PROVIDERS: Final[Collection[str]] = _RegisteredProviders()
ALIASES: Final = {"codex_exec": "codex"}
_MAX_ID: Final = 256


@dataclass(frozen=True)
class ModelRef:
    provider: str
    model: str | None = None

    @property
    def id(self) -> str:
        return f"{self.provider}:{self.model}" if self.model else self.provider


def resolve_provider(name: str, providers: Collection[str] = PROVIDERS) -> str | None:
    """The canonical provider for ``name`` (case-insensitive, ASM's aliases), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in providers else None


def parse_model(model_id: str | None, *, providers: Collection[str] = PROVIDERS,
                require_model: bool = False) -> ModelRef:
    """``provider[:model]`` -> ModelRef; a 400/404 :class:`InferenceError` with ASM's reason as its code."""
    if model_id is None or not model_id.strip():
        raise InferenceError(400, "you must provide a model parameter (a provider, e.g. \"claude\", or "
                             "provider:model, e.g. \"claude:sonnet\")", param="model", code="missing_model")
    if len(model_id) > _MAX_ID:
        raise InferenceError(400, f"model id is longer than {_MAX_ID} characters", param="model")
    head, sep, tail = model_id.partition(":")
    provider = resolve_provider(head, providers)
    if provider is None:
        raise InferenceError(404, f"unsupported provider {head.strip()!r} in model {model_id!r} "
                             f"(expected one of {', '.join(sorted(providers))})",
                             param="model", code="unsupported_provider")
    model = tail.strip() or None
    if model is None and (sep or require_model):
        raise InferenceError(400, f"model {model_id!r} names no model identity (expected provider:model)",
                             param="model", code="missing_model_identity")
    return ModelRef(provider, model)


def models_of(provider: str) -> tuple[str, ...]:
    """The models a provider's module declares (``Provider.models``); none for an unknown provider."""
    cls = provider_class(provider)
    return cls.models if cls is not None else ()


def catalog_ids(providers: list[str] | tuple[str, ...]) -> list[str]:
    """The model ids ``/v1/models`` lists for these providers: each bare, then its catalog's models."""
    out: list[str] = []
    for p in providers:
        out.append(p)
        out.extend(f"{p}:{m}" for m in models_of(p))
    return out
