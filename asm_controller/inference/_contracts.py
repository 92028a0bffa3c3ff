"""ASM's inference contracts (``inference.v1``): manifests, the compatibility check, the descriptor.

Atoms become strings (``:task`` -> ``"task"``); capability keys are written without ASM's trailing
``?`` (``streaming``, ``tool_calling``), and a key given with it (``"streaming?"``) is read the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONTRACT_VERSION: Final = "inference.v1"
Capability = bool | Literal["unknown"]

#: Each provider's core-profile capabilities (what ASM's publication is derived from).
PROFILE_CAPABILITIES: Final[dict[str, tuple[str, ...]]] = {
    "claude": ("streaming", "tools", "thinking", "mcp"),
    "codex": ("streaming", "tools", "reasoning", "mcp"),
    "gemini": ("streaming", "tools", "extensions"),
    "amp": ("streaming", "tools"),
    "shell": ("streaming",),  # asm's own: one command line, no tools
}
_AGENT_V2: Final = frozenset({"claude", "codex"})
_COMMON_SURFACE_ONLY: Final = frozenset({"amp", "gemini"})
_COMPLETION_CAPS: Final = frozenset({"streaming", "reasoning", "thinking", "tools", "extensions", "mcp"})


def _strip(key: str) -> str:
    return key[:-1] if key.endswith("?") else key


def _stripped_keys(value: Any) -> Any:
    return {_strip(str(k)): v for k, v in value.items()} if isinstance(value, Mapping) else value


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    contract_version: Literal["inference.v1"] = CONTRACT_VERSION

    @model_validator(mode="before")
    @classmethod
    def _string_keys(cls, data: Any) -> Any:
        # ASM's new/1 takes atom or string keys; a "?" suffix on a capability field name is ASM's spelling.
        if isinstance(data, Mapping):
            return {_strip(str(k)): v for k, v in data.items()}
        return data


class ConsumerManifest(_Contract):
    consumer: str | None = None
    accepted_runtime_kinds: list[str] = Field(default_factory=lambda: ["task"])
    accepted_management_modes: list[str] = Field(default_factory=lambda: ["jido_managed"])
    accepted_protocols: list[str] = Field(default_factory=lambda: ["openai_chat_completions"])
    required_capabilities: dict[str, Any] = Field(default_factory=dict)
    optional_capabilities: dict[str, Any] = Field(default_factory=dict)
    constraints: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("required_capabilities", "optional_capabilities", mode="before")
    @classmethod
    def _capability_keys(cls, value: Any) -> Any:
        return _stripped_keys(value)


def consumer_manifest() -> ConsumerManifest:
    """ASM's own consumer manifest (``consumer_manifest/0``)."""
    return ConsumerManifest(consumer="asm_openai_endpoint", optional_capabilities={"streaming": True},
                            constraints={"target_class": "cli_endpoint"},
                            metadata={"source_runtime": "agent_session_manager"})


class BackendCapabilities(BaseModel):
    """Each a bool or "unknown" (anything else is refused, as ASM raised)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _string_keys(cls, data: Any) -> Any:
        return _stripped_keys(data)

    streaming: Capability = "unknown"
    tool_calling: Capability = "unknown"
    embeddings: Capability = "unknown"

    def get(self, key: str) -> Any:
        """The capability by name (None for one the backend does not declare)."""
        return self.model_dump().get(key)


class BackendManifest(_Contract):
    backend: str = "asm_inference_endpoint"
    runtime_kind: str = "task"
    management_modes: list[str] = Field(default_factory=lambda: ["jido_managed"])
    startup_kind: str = "spawned"
    protocols: list[str] = Field(default_factory=lambda: ["openai_chat_completions"])
    capabilities: BackendCapabilities = Field(default_factory=BackendCapabilities)
    supported_surfaces: list[str] = Field(default_factory=lambda: ["local_subprocess", "ssh_exec", "guest_bridge"])
    resource_profile: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class CompatibilityResult(_Contract):
    compatible: bool = False
    reason: str = "unresolved"
    resolved_runtime_kind: str | None = None
    resolved_management_mode: str | None = None
    resolved_protocol: str | None = None
    warnings: list[str] = Field(default_factory=list)
    missing_requirements: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class EndpointDescriptor(_Contract):
    endpoint_id: str
    runtime_kind: str = "task"
    management_mode: str = "jido_managed"
    target_class: str = "cli_endpoint"
    protocol: str = "openai_chat_completions"
    base_url: str
    headers: dict[str, str] = Field(default_factory=dict)
    provider_identity: str
    model_identity: str
    source_runtime: str = "agent_session_manager"
    source_runtime_ref: str
    lease_ref: str
    health_ref: str
    boundary_ref: str | None = None
    capabilities: dict[str, Capability] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: asm: when the lease expires (unix seconds); ASM's leases never did.
    expires_at: float | None = None


class ModelPreference(BaseModel):
    model_config = ConfigDict(extra="allow")

    provider: str | None = None
    id: str | None = None
    model: str | None = None


class EndpointRequest(BaseModel):
    """What ``ensure_endpoint`` is asked for (ASM's request map; ``stream?`` is read as ``stream``)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    request_id: str | None = None
    operation: str | None = None
    messages: list[Any] | None = None
    prompt: str | None = None
    model_preference: ModelPreference = Field(default_factory=ModelPreference)
    target_preference: dict[str, Any] = Field(default_factory=dict)
    stream: bool | Literal["true", "false"] | None = Field(default=None, alias="stream?")
    tool_policy: dict[str, Any] = Field(default_factory=dict)
    tools: list[Any] | None = None
    tool_choice: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _stream_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "stream" in data and "stream?" not in data:
            data = {**data, "stream?": data["stream"]}
            del data["stream"]
        return data

    @property
    def wants_stream(self) -> bool:
        return self.stream is True or self.stream == "true"

    @property
    def uses_tools(self) -> bool:
        """ASM's test: ``tool_policy.tools`` (else ``tools``) non-empty, or ``tool_choice`` not nil/none."""
        tools = self.tool_policy.get("tools", self.tools)
        return (isinstance(tools, list) and len(tools) > 0) or self.tool_choice not in (None, "none")


def publication(provider: str) -> dict[str, Any]:
    """What a provider publishes, derived from its core profile's capabilities as ASM derives it."""
    caps = PROFILE_CAPABILITIES.get(provider, ())
    completion = bool(_COMPLETION_CAPS & set(caps))
    streaming = "streaming" in caps
    agent_v2 = provider in _AGENT_V2 and streaming and "tools" in caps
    common_only = provider in _COMMON_SURFACE_ONLY
    derivation = []
    if completion:
        derivation.append("prompt_driven_cli_profile")
    if streaming:
        derivation.append("streaming_profile_capability")
    derivation.append("common_surface_only_provider" if common_only else "provider_native_extension_surface")
    return {
        "cli_completion_v1": completion, "cli_streaming_v1": streaming, "cli_agent_v2": agent_v2,
        "common_surface_only": common_only, "derivation": derivation, "profile_capabilities": list(caps),
    }


def backend_manifest(provider: str, pub: Mapping[str, Any]) -> BackendManifest:
    published = {k: pub[k] for k in ("cli_completion_v1", "cli_streaming_v1", "cli_agent_v2")}
    return BackendManifest(
        capabilities=BackendCapabilities(streaming=pub["cli_streaming_v1"], tool_calling=False, embeddings="unknown"),
        resource_profile={"profile": "cli_session"},
        metadata={"family": "asm", "provider": provider, "common_surface_only": pub["common_surface_only"],
                  "published_capabilities": published, "profile_capabilities": pub["profile_capabilities"],
                  "derivation": pub["derivation"]},
    )


def resolve_compatibility(request: EndpointRequest, consumer: ConsumerManifest,
                          backend: BackendManifest) -> CompatibilityResult:
    """ASM's ``Compatibility.resolve``: the checks in ASM's order, the first failing one wins."""
    if backend.runtime_kind not in consumer.accepted_runtime_kinds:
        return CompatibilityResult(reason="runtime_kind_mismatch", missing_requirements=["runtime_kind"])
    mode = next((m for m in backend.management_modes if m in consumer.accepted_management_modes), None)
    if mode is None:
        return CompatibilityResult(reason="management_mode_mismatch", resolved_runtime_kind=backend.runtime_kind,
                                   missing_requirements=["management_mode"])
    protocol = next((p for p in backend.protocols if p in consumer.accepted_protocols), None)
    resolved: dict[str, Any] = {"resolved_runtime_kind": backend.runtime_kind, "resolved_management_mode": mode}
    if protocol is None:
        return CompatibilityResult(reason="unsupported_protocol", missing_requirements=["protocol"], **resolved)
    resolved["resolved_protocol"] = protocol
    caps = backend.capabilities
    if request.wants_stream and caps.streaming is not True:
        return CompatibilityResult(reason="missing_streaming", missing_requirements=["streaming"],
                                   metadata={"requested_stream": True}, **resolved)
    if request.uses_tools:
        return CompatibilityResult(reason="missing_capability", missing_requirements=["tool_calling"],
                                   metadata={"requested_tools": True}, **resolved)
    for key, expected in consumer.required_capabilities.items():
        # Strict equality, as in ASM: "unknown" matches only "unknown", never False.
        if caps.get(key) != expected or isinstance(caps.get(key), bool) != isinstance(expected, bool):
            reason = "missing_streaming" if key == "streaming" else "missing_capability"
            return CompatibilityResult(reason=reason, missing_requirements=[key], **resolved)
    warnings = [k for k, v in consumer.optional_capabilities.items()
                if caps.get(k) != v or isinstance(caps.get(k), bool) != isinstance(v, bool)]
    meta = backend.metadata
    return CompatibilityResult(
        compatible=True, reason="protocol_match", warnings=warnings, **resolved,
        metadata={"backend": backend.backend, "consumer": consumer.consumer, "provider": meta.get("provider"),
                  "published_capabilities": meta.get("published_capabilities"),
                  "common_surface_only": meta.get("common_surface_only")},
    )
