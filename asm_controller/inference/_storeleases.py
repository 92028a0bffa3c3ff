"""Endpoint leases in the controller's run store: every replica serves every lease, a restart keeps them.

The store holds the token's sha256 digest only (never the token): the caller got the token once, in
its EndpointDescriptor, and a lease read back is authenticated by the digest (:meth:`Lease.authorized`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asm_controller.inference._leases import Lease, token_digest

if TYPE_CHECKING:
    from asm_controller._store import EndpointLeaseRecord, RunStore

#: The lease's fields the store's own columns hold (the rest goes to its JSON ``data``).
_COLUMNS = frozenset({"lease_ref", "auth_token", "token_digest", "principal", "provider", "model",
                      "created_at", "expires_at"})


def lease_record(lease: Lease) -> EndpointLeaseRecord:
    """The store's row for ``lease`` (its token as a digest)."""
    from asm_controller._store import EndpointLeaseRecord

    digest = lease.token_digest or token_digest(lease.auth_token)
    return EndpointLeaseRecord(ref=lease.lease_ref, owner=lease.principal, provider=lease.provider, model=lease.model,
                               token_digest=digest, created_at=lease.created_at, expires_at=lease.expires_at,
                               data=lease.model_dump(exclude=set(_COLUMNS)))


def lease_of_record(rec: EndpointLeaseRecord) -> Lease:
    """The lease a stored row describes (no token: authenticated by its digest)."""
    return Lease.model_validate({**rec.data, "lease_ref": rec.ref, "token_digest": rec.token_digest,
                                 "principal": rec.owner, "provider": rec.provider, "model": rec.model,
                                 "created_at": rec.created_at, "expires_at": rec.expires_at})


class StoreLeaseStore:
    """A :class:`~asm_controller.inference.LeaseStore` over a :class:`~asm_controller._store.RunStore`."""

    def __init__(self, store: RunStore, *, sweep_limit: int = 500) -> None:
        self.store = store
        self.sweep_limit = sweep_limit

    async def get(self, lease_ref: str) -> Lease | None:
        from asm_controller._store import InvalidRecord

        try:
            rec = await self.store.get_endpoint_lease(lease_ref)
        except InvalidRecord:  # a ref no lease can have (too long, NUL): unknown, as any other
            return None
        return lease_of_record(rec) if rec is not None else None

    async def put(self, lease: Lease) -> None:
        await self.store.put_endpoint_lease(lease_record(lease))

    async def delete(self, lease_ref: str) -> None:
        from asm_controller._store import InvalidRecord

        try:
            await self.store.delete_endpoint_lease(lease_ref)
        except InvalidRecord:
            return None

    async def expired(self, now: float) -> list[str]:
        return await self.store.expired_endpoint_leases(now=now, limit=self.sweep_limit)
