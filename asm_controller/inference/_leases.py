"""Endpoint leases: ``ensure_endpoint`` publishes a provider (and model) at its own base URL and token,
``release_endpoint`` withdraws it.

ASM's flow (section 7.2), with asm's differences: leases expire (``ttl_s``; ASM's lived until released),
a lease records the principal that asked for it (its runs are that principal's), the base URL is the
controller's HTTP server (``/leases/<ref>/v1``) rather than a private loopback listener, and leases
live in a :class:`LeaseStore` -- in memory here; the controller backs it by its run store so every
replica can serve every lease.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from asm_controller.inference._contracts import (
    CompatibilityResult,
    ConsumerManifest,
    EndpointDescriptor,
    EndpointRequest,
    backend_manifest,
    publication,
    resolve_compatibility,
)
from asm_controller.inference._modelid import PROVIDERS, resolve_provider
from asm_wire import ConfigError, ulid
from asm_wire._principal import Principal, current_principal

#: How long a lease lives unless asked otherwise (seconds).
DEFAULT_TTL_S = 3600.0
#: The longest lease one may ask for (a day): a forgotten lease must not be a token that works for ever.
MAX_TTL_S = 86_400.0


class EndpointError(ConfigError):
    """``ensure_endpoint`` refused: ``reason`` is ASM's error tag (invalid_request, invalid_consumer_manifest,
    unsupported_provider, missing_model_identity, incompatible); ``result`` the failed compatibility."""

    def __init__(self, reason: str, message: str, *, result: CompatibilityResult | None = None) -> None:
        super().__init__(message, reason=reason)
        self.result = result


def token_digest(token: str) -> str:
    """``sha256:<hex>`` of a lease token: what a store keeps instead of the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class Lease(BaseModel):
    """One published endpoint: what the ``/leases/<ref>/...`` routes serve, and for whom.

    ``auth_token`` is known only to the lease ensure_endpoint made (it is handed to the caller once);
    a lease read back from a durable store has "" there and is authenticated by ``token_digest``."""

    model_config = ConfigDict(frozen=True)

    lease_ref: str
    endpoint_id: str
    auth_token: str = Field(default="", repr=False)  # never in a log line
    token_digest: str = ""
    provider: str
    model: str
    principal: str
    admin: bool = False
    streaming: bool = True
    boundary_ref: str | None = None
    created_at: float
    expires_at: float

    @model_validator(mode="before")
    @classmethod
    def _digest(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("auth_token") and not data.get("token_digest"):
            data = {**data, "token_digest": token_digest(str(data["auth_token"]))}
        return data

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def authorized(self, header: str | None) -> bool:
        """The header is exactly ``Bearer <token>`` (ASM's rule); the token's digest is compared in constant
        time (the digests have one length whatever was sent). A lease without a digest authorizes nobody."""
        header = header or ""
        presented = token_digest(header[7:]) if header.startswith("Bearer ") else ""
        return bool(self.token_digest) and hmac.compare_digest(presented.encode(), self.token_digest.encode())

    def owner(self) -> Principal:
        return Principal(self.principal, admin=self.admin)

    def accepts_model(self, model: str) -> bool:
        """The pinned model, by its own name (ASM) or as ``provider:model`` (asm)."""
        return model in (self.model, f"{self.provider}:{self.model}")


class LeaseStore(Protocol):
    """Where leases live (the controller backs it by its run store)."""

    async def get(self, lease_ref: str) -> Lease | None: ...

    async def put(self, lease: Lease) -> None: ...

    async def delete(self, lease_ref: str) -> None: ...

    async def expired(self, now: float) -> list[str]:
        """The refs of leases expired at ``now``."""
        ...


class MemoryLeaseStore:
    """A :class:`LeaseStore` in this process (one controller, tests)."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}

    async def get(self, lease_ref: str) -> Lease | None:
        return self._leases.get(lease_ref)

    async def put(self, lease: Lease) -> None:
        self._leases[lease.lease_ref] = lease

    async def delete(self, lease_ref: str) -> None:
        self._leases.pop(lease_ref, None)

    async def expired(self, now: float) -> list[str]:
        return [ref for ref, lease in self._leases.items() if lease.expired(now)]

    def __len__(self) -> int:
        return len(self._leases)


class EndpointPublisher:
    """``ensure_endpoint`` / ``release_endpoint`` over a lease store, for one HTTP server's base URL."""

    def __init__(self, base_url_root: str, store: LeaseStore | None = None, *, ttl_s: float = DEFAULT_TTL_S,
                 providers: Collection[str] = PROVIDERS) -> None:
        self.base_url_root = base_url_root.rstrip("/")
        self.store: LeaseStore = store if store is not None else MemoryLeaseStore()
        self.ttl_s = ttl_s
        self.providers = providers

    async def ensure_endpoint(self, request: EndpointRequest | Mapping[str, Any],
                              consumer_manifest: ConsumerManifest | Mapping[str, Any],
                              context: Mapping[str, Any] | None = None, *,
                              ttl_s: float | None = None) -> tuple[EndpointDescriptor, CompatibilityResult]:
        """Publish the request's provider and model; raises :class:`EndpointError` (ASM's reasons, ASM's order)."""
        # 1. inputs
        if not isinstance(request, EndpointRequest):
            if not isinstance(request, Mapping):
                raise EndpointError("invalid_request", f"invalid request: {request!r}")
            try:
                request = EndpointRequest.model_validate(dict(request))
            except ValidationError as e:
                raise EndpointError("invalid_request", f"invalid request: {e.errors()[0]['msg']}") from None
        if not isinstance(consumer_manifest, ConsumerManifest):
            if not isinstance(consumer_manifest, Mapping):
                raise EndpointError("invalid_consumer_manifest", f"invalid consumer manifest: {consumer_manifest!r}")
            try:
                consumer_manifest = ConsumerManifest.model_validate(dict(consumer_manifest))
            except ValidationError as e:
                raise EndpointError("invalid_consumer_manifest",
                                    f"invalid consumer manifest: {e.errors()[0]['msg']}") from None
        # 2. provider and model
        pref = request.model_preference
        provider = resolve_provider(pref.provider, self.providers) if isinstance(pref.provider, str) else None
        if provider is None:
            raise EndpointError("unsupported_provider", f"unsupported provider: {pref.provider!r} "
                                f"(expected one of {', '.join(sorted(self.providers))})")
        model = pref.id or pref.model
        if not isinstance(model, str) or not model.strip():
            raise EndpointError("missing_model_identity", f"missing model identity: {model!r} "
                                "(model_preference.id or .model)")
        model = model.strip()
        # 3-5. publication, backend manifest, compatibility
        pub = publication(provider)
        backend = backend_manifest(provider, pub)
        compat = resolve_compatibility(request, consumer_manifest, backend)
        if not compat.compatible:
            raise EndpointError("incompatible", f"incompatible endpoint request: {compat.reason} "
                                f"(missing {', '.join(compat.missing_requirements)})", result=compat)
        # 6-7. lease
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= MAX_TTL_S:
            raise EndpointError("invalid_request", f"ttl_s must be in (0, {MAX_TTL_S:g}], got {ttl!r}")
        principal = current_principal()
        now = time.time()
        lease = Lease(
            lease_ref=f"lease_{ulid()}", endpoint_id=f"endpoint_{ulid()}", auth_token=secrets.token_urlsafe(18),
            provider=provider, model=model, principal=principal.name, admin=principal.admin,
            streaming=bool(pub["cli_streaming_v1"]), boundary_ref=(context or {}).get("boundary_ref"),
            created_at=now, expires_at=now + ttl,
        )
        await self.store.put(lease)
        # 8. descriptor
        root = f"{self.base_url_root}/leases/{lease.lease_ref}"
        descriptor = EndpointDescriptor(
            endpoint_id=lease.endpoint_id, base_url=f"{root}/v1", health_ref=f"{root}/health",
            headers={"authorization": f"Bearer {lease.auth_token}"}, provider_identity=provider,
            model_identity=model, source_runtime_ref=lease.lease_ref, lease_ref=lease.lease_ref,
            boundary_ref=lease.boundary_ref, capabilities={"streaming": lease.streaming, "tool_calling": False},
            metadata={"publication": pub, "backend_manifest": backend.model_dump()}, expires_at=lease.expires_at,
        )
        return descriptor, compat

    async def release_endpoint(self, lease: str | EndpointDescriptor | Mapping[str, Any]) -> None:
        """Withdraw a lease (by ref, descriptor or ``{"lease_ref": ...}``); idempotent, like ASM's."""
        if isinstance(lease, EndpointDescriptor):
            ref: Any = lease.lease_ref
        elif isinstance(lease, Mapping):
            ref = lease.get("lease_ref")
        else:
            ref = lease
        if isinstance(ref, str) and ref:
            await self.store.delete(ref)

    async def lookup(self, lease_ref: str) -> Lease | None:
        """The live lease by that ref (an expired one is deleted and reads as unknown)."""
        lease = await self.store.get(lease_ref)
        if lease is not None and lease.expired():
            await self.store.delete(lease_ref)
            return None
        return lease

    async def sweep(self) -> int:
        """Delete expired leases (call it now and then); how many went."""
        refs = await self.store.expired(time.time())
        for ref in refs:
            await self.store.delete(ref)
        return len(refs)
