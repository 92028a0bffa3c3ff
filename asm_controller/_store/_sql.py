"""The SQL run store: SQLAlchemy 2 Core over asyncio, aiosqlite for SQLite and asyncpg for PostgreSQL.

One schema (``_migrations``), one pool model (SQLAlchemy's async queue pool), the same statements
on both backends. SQLite runs in WAL mode with ``synchronous=NORMAL`` (a commit is a WAL write
without fsync: durable when the process is killed, not on power loss) and every write
transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock up front, so two processes never
deadlock upgrading a read lock; readers are not blocked in WAL mode). A run's hot path on SQLite
(create, get, update, appends, the writer's batches) runs each operation whole on one thread of the
store's own with the stdlib driver (:meth:`SqlStore._sync_op`): through aiosqlite every statement
was about three hops between the event loop and its thread. Driver failures are
translated at this edge into :class:`StoreError` with the display URL (password hidden).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from asm_controller._store._base import (
    DEFAULT_HISTORY_MAX_BYTES,
    FIELDS,
    IN_FLIGHT,
    LIVE,
    QUEUED,
    STORE_OPS,
    BatchOp,
    Cursor,
    EndpointLeaseRecord,
    EventsOp,
    InvalidRecord,
    Lease,
    LeaseLost,
    ReplicaRecord,
    RunExists,
    RunRecord,
    SessionRecord,
    StatusFilter,
    StoreError,
    StoreLocked,
    UpdateOp,
    check_chunk,
    check_cursor,
    check_endpoint_lease,
    check_expect,
    check_fence,
    check_filter_text,
    check_lease_ref,
    check_limit,
    check_max_bytes,
    check_meta,
    check_owner,
    check_record,
    check_seq,
    check_statuses,
    check_take,
    check_text,
    check_time,
    check_update,
    endpoint_lease_from_columns,
    lease_lost,
    overlap_error,
    record_from_columns,
)
from asm_controller._store._migrations import (
    MIGRATIONS,
    Migration,
    endpoint_leases,
    meta,
    migrate_step,
    replicas,
    run_events,
    runs,
)
from asm_wire import AsmError, RunNotFound

_T = TypeVar("_T")
_SyncSide = tuple[sa.Engine, concurrent.futures.ThreadPoolExecutor]  # an engine and the one thread it runs on

log = logging.getLogger("asm_controller.store")

_RECORD_COLUMNS = [runs.c[name] for name in FIELDS]
#: list_runs() never reads the prompt (a history listing must not ship prompts).
_LIST_COLUMNS = [runs.c[name] for name in FIELDS if name != "prompt"]
#: Oldest chunks looked at per round when the history bound drops some.
_TRIM_BATCH = 256
#: The page size of a new SQLite file (an existing one keeps its own: WAL mode cannot change it). A
#: relayed stream's chunks are blobs of up to 1 MiB: with SQLite's default 4 KiB pages each is 256
#: overflow pages, each written to the WAL and again to the file by a checkpoint, a system call per
#: page. 16 KiB pages write a stream's log with about half the CPU; a small transaction (a run's
#: record) costs the same (docs/benchmarks.md, "The relay's second pass").
SQLITE_PAGE_SIZE = 16384


class SqlStore:
    """A RunStore in SQLite or PostgreSQL (see :func:`asm_controller.open_store` for the URL forms)."""

    def __init__(self, url: sa.URL, *, display_url: str, sqlite_path: Path | None = None,
                 history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES, connect_timeout_s: float = 5.0,
                 migrations: Sequence[Migration] = MIGRATIONS,
                 observe: Callable[[str, float], None] | None = None) -> None:
        self.url = display_url
        self.history_max_bytes = history_max_bytes
        self._sa_url = url
        self._sqlite_path = sqlite_path
        self._connect_timeout_s = connect_timeout_s
        self._migrations = tuple(migrations)
        #: Called with (op, seconds) after every public operation (op from STORE_OPS), failed ones too.
        self._observe = observe
        self._engine: AsyncEngine | None = None
        self._wengine: AsyncEngine | None = None
        self._claim_fd: int | None = None
        #: SQLite: the hot path's synchronous engines (pysqlite), each used on one thread of its own:
        #: (reads, writes). A read never queues behind a write that waits for SQLite's lock (WAL
        #: readers are not blocked), and a connection never leaves the thread that made it.
        self._sync: tuple[_SyncSide, _SyncSide] | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and bring the schema to this code's version (a no-op when it is there already)."""
        if self._engine is not None:
            return
        if self._sqlite_path is not None:
            self._prepare_sqlite_file(self._sqlite_path)
        engine = self._create_engine()
        self._engine, self._wengine = engine, engine.execution_options(asm_write=True)
        try:
            with self._translated("open"):
                while True:
                    async with self._wengine.begin() as conn:
                        if not await conn.run_sync(migrate_step, self._migrations, self.url):
                            break
            if self._sqlite_path is not None:
                sides = []
                for name in ("read", "write"):
                    sync = sa.create_engine(self._sa_url.set(drivername="sqlite+pysqlite"),
                                            connect_args={"timeout": self._connect_timeout_s})
                    self._sqlite_hooks(sync)
                    sides.append((sync.execution_options(asm_write=True) if name == "write" else sync,
                                  concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"asm-sqlite-{name}")))
                self._sync = (sides[0], sides[1])
        except BaseException:
            await self.close()
            raise

    async def claim(self) -> None:
        """SQLite: make this process the store's only controller (until close); StoreLocked
        (``store_in_use``) if another holds it: two controllers on one SQLite file would both
        re-attach (and end) the same runs, and SQLite is the single-controller store. The lock is an
        exclusive flock on ``PATH.lock`` (released by the kernel if this process dies).

        PostgreSQL: a no-op. Replicas share the database; each live run is kept to one replica by
        its lease (take_lease, fenced writes), not by a store-wide lock.
        """
        with self._translated("claim"):
            self._engines()
            if self._sqlite_path is None or self._claim_fd is not None:
                return
            lock = self._sqlite_path.with_name(self._sqlite_path.name + ".lock")
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"the run store {self.url} cannot be locked: {exc.strerror} ({lock})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreLocked(f"another controller uses the run store {self.url} (SQLite is the "
                                  "single-controller store: give each controller its own --state, or use "
                                  "PostgreSQL for replicas)") from None
            self._claim_fd = fd

    async def close(self) -> None:
        if self._claim_fd is not None:
            os.close(self._claim_fd)  # releases the flock
            self._claim_fd = None
        sides, self._sync = self._sync, None
        for sync, thread in sides or ():
            with contextlib.suppress(Exception):  # its connections are closed on the thread that made them
                await asyncio.get_running_loop().run_in_executor(thread, sync.dispose)
            thread.shutdown(wait=False)
        engine, self._engine, self._wengine = self._engine, None, None
        if engine is not None:
            with contextlib.suppress(Exception):  # a dead server must not turn close() into an error
                await engine.dispose()

    def _prepare_sqlite_file(self, path: Path) -> None:
        """The directory (0700) and the file (0600) before SQLite creates them with the umask."""
        try:
            for parent in (path.parent, *path.parent.parents):
                if parent.exists():
                    if not parent.is_dir():
                        raise StoreError(f"the run store {self.url} cannot be created: {parent} is not a directory")
                    break
            if path.is_dir():
                raise StoreError(f"the run store {self.url} cannot be used: {path} is a directory")
            missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
            for directory in reversed(missing):  # mkdir(parents=True) would give the parents the umask's mode
                directory.mkdir(mode=0o700)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StoreError(f"the run store {self.url} cannot be created: {exc.strerror or exc}"
                             f" ({exc.filename or path})") from None

    def _create_engine(self) -> AsyncEngine:
        if self._sqlite_path is not None:
            engine = create_async_engine(self._sa_url, connect_args={"timeout": self._connect_timeout_s})
            self._sqlite_hooks(engine.sync_engine)
            return engine
        return create_async_engine(
            self._sa_url, pool_pre_ping=True, pool_size=4, max_overflow=4,
            pool_timeout=max(self._connect_timeout_s, 1.0),
            connect_args={"timeout": self._connect_timeout_s, "command_timeout": 60},
        )

    def _sqlite_hooks(self, engine: sa.Engine) -> None:
        """Every SQLite connection (aiosqlite's and the hot path's): WAL, NORMAL, the busy timeout, our BEGINs."""
        busy_ms = int(self._connect_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # the driver's implicit BEGIN off: ours below
            cursor = dbapi_conn.cursor()
            # page_size first: it applies only while the file is still empty (then WAL fixes it).
            for pragma in (f"page_size={SQLITE_PAGE_SIZE}", "journal_mode=WAL", "synchronous=NORMAL",
                           f"busy_timeout={busy_ms}"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            immediate = conn.get_execution_options().get("asm_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    async def _sync_op(self, fn: Callable[[sa.Connection], _T], *, write: bool) -> _T:
        """``fn`` on a connection in one transaction (a write one: BEGIN IMMEDIATE; committed when it
        returns, rolled back when it raises). SQLite: all of it on the store's read or write thread, one
        hop from the event loop; PostgreSQL: on the async engine (``run_sync``: the same statements,
        awaited)."""
        reader, writer = self._engines()
        if self._sync is not None:
            sync, thread = self._sync[1 if write else 0]

            def whole() -> _T:
                with sync.begin() as conn:
                    return fn(conn)

            return await asyncio.get_running_loop().run_in_executor(thread, whole)
        async with (writer if write else reader).begin() as conn:
            return await conn.run_sync(fn)

    def _engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        if self._engine is None or self._wengine is None:
            raise StoreError(f"the run store {self.url} is not open (call open() first)")
        return self._engine, self._wengine

    @contextlib.contextmanager
    def _translated(self, op: str) -> Iterator[None]:
        """One public operation: driver and OS failures -> StoreError naming the store (password
        hidden); its duration goes to the ``observe`` hook (failures too)."""
        assert op in STORE_OPS, op
        started = time.perf_counter()
        try:
            yield
        except AsmError:
            raise
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise StoreError(f"the run store {self.url} failed ({op}): {self._describe(exc)}") from None
        except Exception as exc:
            if type(exc).__module__.split(".")[0] in ("asyncpg", "aiosqlite", "sqlite3"):
                raise StoreError(f"the run store {self.url} failed ({op}): {self._describe(exc)}") from None
            raise
        finally:
            if self._observe is not None:
                try:
                    self._observe(op, time.perf_counter() - started)
                except Exception:  # a metrics hook's bug must not fail the store's operation
                    log.exception("run store %s: the observe hook failed", self.url)

    def _describe(self, exc: BaseException) -> str:
        orig = getattr(exc, "orig", None) or exc
        text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        if isinstance(orig, OSError) and type(orig).__name__ not in text:
            text = f"{type(orig).__name__}: {text}"  # "[Errno 111] Connect call failed" needs its name
        password = self._sa_url.password
        if password:
            text = text.replace(str(password), "***")
        return text

    # --- meta -------------------------------------------------------------------------------------

    async def meta_get(self, key: str) -> str | None:
        check_meta(key)
        reader, _ = self._engines()
        with self._translated("meta_get"):
            async with reader.connect() as conn:
                value = (await conn.execute(sa.select(meta.c.value).where(meta.c.key == key))).scalar()
        return None if value is None else str(value)

    async def meta_set(self, key: str, value: str) -> None:
        check_meta(key, value, with_value=True)
        _, writer = self._engines()
        insert = (pg_dialect.insert(meta) if self._sqlite_path is None else sqlite_dialect.insert(meta))
        stmt = insert.values(key=key, value=value).on_conflict_do_update(
            index_elements=[meta.c.key], set_={"value": value})
        with self._translated("meta_set"):
            async with writer.begin() as conn:
                await conn.execute(stmt)

    # --- runs -------------------------------------------------------------------------------------

    async def create(self, rec: RunRecord) -> None:
        cols = check_record(rec)
        now = time.time()
        cols["created_at"] = cols["created_at"] or now
        cols["updated_at"] = cols["updated_at"] or cols["created_at"]
        if cols["status"] == QUEUED and cols["queued_at"] is None:
            cols["queued_at"] = cols["created_at"]  # a run created queued entered the queue then
        def insert(conn: sa.Connection) -> None:
            try:
                conn.execute(sa.insert(runs).values(**cols, held_bytes=0))
            except sa.exc.IntegrityError:  # the only constraint is the primary key
                raise RunExists(f"run {rec.run_id} is already recorded") from None

        with self._translated("create"):
            await self._sync_op(insert, write=True)

    async def get(self, run_id: str) -> RunRecord | None:
        check_text("run_id", run_id)
        query = sa.select(*_RECORD_COLUMNS).where(runs.c.run_id == run_id)
        with self._translated("get"):
            row = await self._sync_op(lambda conn: conn.execute(query).first(), write=False)
        return record_from_columns(dict(row._mapping)) if row is not None else None

    async def update(self, run_id: str, *, fence: Lease | None = None,
                     expect_status: StatusFilter | None = None, **fields: Any) -> None:
        cols = check_update(fields)
        check_text("run_id", run_id)
        fenced, expect = check_expect(fence, expect_status)
        with self._translated("update"):
            await self._sync_op(lambda conn: self._update_in(conn, run_id, cols, fenced, expect), write=True)

    def _update_in(self, conn: sa.Connection, run_id: str, cols: dict[str, Any],
                         fence: Lease | None = None, expect: tuple[str, ...] | None = None) -> None:
        # One UPDATE whose WHERE holds the fence and the expected status: the compare-and-set is atomic
        # (PostgreSQL re-checks the WHERE on the row a concurrent writer committed). Only when it matched
        # nothing is the row read, to say why.
        cols.setdefault("updated_at", time.time())
        stmt = sa.update(runs).where(runs.c.run_id == run_id)
        if fence is not None:
            stmt = stmt.where(runs.c.lease_owner == fence.owner, runs.c.lease_token == fence.token)
        if expect is not None:
            stmt = stmt.where(runs.c.status.in_(expect))
        result = conn.execute(stmt.values(**cols))
        if result.rowcount:
            return
        row = conn.execute(sa.select(runs.c.lease_owner, runs.c.lease_token, runs.c.status)
                           .where(runs.c.run_id == run_id)).first()
        if row is None:
            raise RunNotFound(f"run {run_id} is not recorded")
        raise (lease_lost(run_id, fence, expect, owner=row.lease_owner, token=int(row.lease_token),
                          status=row.status)
               or LeaseLost(f"run {run_id} changed while it was written: try again", details={"run_id": run_id}))

    async def list_runs(self, *, status: StatusFilter | None = None, owner: str | None = None,
                        session_id: str | None = None, provider: str | None = None, node: str | None = None,
                        since: float | None = None, until: float | None = None, before: Cursor | None = None,
                        limit: int = 1000) -> list[RunRecord]:
        where = _run_filters(status=status, owner=owner, session_id=session_id, provider=provider, node=node,
                             since=since, until=until)
        cursor = check_cursor(before)
        if check_limit(limit) == 0:
            return []
        query = sa.select(*_LIST_COLUMNS).where(*where)
        if cursor is not None:
            query = query.where(sa.or_(runs.c.created_at < cursor[0],
                                       sa.and_(runs.c.created_at == cursor[0], runs.c.run_id < cursor[1])))
        query = query.order_by(runs.c.created_at.desc(), runs.c.run_id.desc()).limit(limit)
        return await self._records("list_runs", query)

    async def in_flight(self) -> list[RunRecord]:
        query = (sa.select(*_RECORD_COLUMNS).where(runs.c.status.in_(IN_FLIGHT))
                 .order_by(runs.c.created_at, runs.c.run_id))
        return await self._records("in_flight", query)

    async def _records(self, op: str, query: sa.Select[Any]) -> list[RunRecord]:
        reader, _ = self._engines()
        with self._translated(op):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [record_from_columns(dict(row._mapping)) for row in rows]

    # --- leases -----------------------------------------------------------------------------------

    async def take_lease(self, run_id: str, owner: str, *, seen_token: int, until: float,
                         now: float) -> Lease | None:
        token, expires, at = check_take(run_id, owner, seen_token, until, now)
        _, writer = self._engines()
        # The compare-and-set is this one UPDATE: of two replicas racing for the run, PostgreSQL makes the
        # second wait for the first's row lock and re-checks the WHERE on the row it committed, where
        # lease_token is no longer seen_token (SQLite: BEGIN IMMEDIATE serializes them).
        stmt = (sa.update(runs)
                .where(runs.c.run_id == run_id, runs.c.lease_token == seen_token, runs.c.status.in_(LIVE),
                       sa.or_(runs.c.lease_expires < at, runs.c.lease_owner == owner, runs.c.lease_owner == ""))
                .values(lease_owner=owner, lease_token=token, lease_expires=expires))
        with self._translated("take_lease"):
            async with writer.begin() as conn:
                taken = (await conn.execute(stmt)).rowcount
        return Lease(owner, token) if taken else None

    async def renew_leases(self, owner: str, *, until: float) -> dict[str, int]:
        check_owner("owner", owner)
        expires = check_time("until", until)
        _, writer = self._engines()
        mine = (runs.c.lease_owner == owner, runs.c.status.in_(LIVE))
        stmt = sa.update(runs).where(*mine).values(lease_expires=expires).returning(runs.c.run_id, runs.c.lease_token)
        with self._translated("renew_leases"):
            async with writer.begin() as conn:
                if self._sqlite_path is None:
                    # Row locks in run_id order, as write_batch takes them: a renewal and this replica's
                    # own write-behind batch never lock two runs in opposite orders (a deadlock PostgreSQL
                    # would break by failing one of them; two renewals failing so would fence the replica).
                    await conn.execute(sa.select(runs.c.run_id).where(*mine).order_by(runs.c.run_id)
                                       .with_for_update())
                rows = (await conn.execute(stmt)).all()
        return {str(run_id): int(token) for run_id, token in rows}

    async def release_lease(self, run_id: str, lease: Lease) -> bool:
        check_text("run_id", run_id, empty_ok=False)
        if check_fence(lease) is None:
            raise InvalidRecord("release_lease() needs the Lease it releases")
        _, writer = self._engines()
        stmt = (sa.update(runs).where(runs.c.run_id == run_id, runs.c.lease_owner == lease.owner,
                                      runs.c.lease_token == lease.token)
                .values(lease_expires=0.0))
        with self._translated("release_lease"):
            async with writer.begin() as conn:
                return bool((await conn.execute(stmt)).rowcount)

    async def expired_leases(self, *, now: float, limit: int = 500) -> list[RunRecord]:
        at = check_time("now", now)
        if check_limit(limit) == 0:
            return []
        query = (sa.select(*_RECORD_COLUMNS).where(runs.c.status.in_(LIVE), runs.c.lease_expires < at)
                 .order_by(runs.c.created_at, runs.c.run_id).limit(limit))
        return await self._records("expired_leases", query)

    # --- replicas ---------------------------------------------------------------------------------

    async def heartbeat_replica(self, replica_id: str, address: str, *, now: float, until: float) -> None:
        check_owner("replica_id", replica_id)
        check_text("address", address)
        at, expires = check_time("now", now), check_time("until", until)
        insert = pg_dialect.insert(replicas) if self._sqlite_path is None else sqlite_dialect.insert(replicas)
        stmt = insert.values(replica_id=replica_id, address=address, started_at=at, heartbeat_at=at,
                             expires_at=expires)
        stmt = stmt.on_conflict_do_update(index_elements=[replicas.c.replica_id], set_={
            "address": address, "heartbeat_at": at, "expires_at": expires,
            # A replica back after it was dead (same --replica-id) started again now.
            "started_at": sa.case((replicas.c.expires_at < at, at), else_=replicas.c.started_at),
        })
        _, writer = self._engines()
        with self._translated("heartbeat_replica"):
            async with writer.begin() as conn:
                await conn.execute(stmt)

    async def remove_replica(self, replica_id: str) -> None:
        check_owner("replica_id", replica_id)
        _, writer = self._engines()
        with self._translated("remove_replica"):
            async with writer.begin() as conn:
                await conn.execute(sa.delete(replicas).where(replicas.c.replica_id == replica_id))

    async def replicas(self, *, now: float) -> list[ReplicaRecord]:
        at = check_time("now", now)
        leases = (sa.select(sa.func.count()).select_from(runs)
                  .where(runs.c.lease_owner == replicas.c.replica_id, runs.c.status.in_(LIVE),
                         runs.c.lease_expires >= at)
                  .correlate(replicas).scalar_subquery())
        query = (sa.select(replicas, leases.label("leases")).where(replicas.c.expires_at >= at)
                 .order_by(replicas.c.replica_id))
        reader, _ = self._engines()
        with self._translated("replicas"):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [ReplicaRecord(str(r.replica_id), str(r.address), float(r.started_at), float(r.heartbeat_at),
                              float(r.expires_at), int(r.leases)) for r in rows]

    # --- the fleet queue --------------------------------------------------------------------------

    async def queued(self, *, limit: int = 1000, owner: str | None = None,
                     lease_owner: str | None = None) -> list[RunRecord]:
        principal = check_filter_text("owner", owner, "owner")
        replica = check_filter_text("lease_owner", lease_owner, "lease_owner")
        if check_limit(limit) == 0:
            return []
        query = sa.select(*_RECORD_COLUMNS).where(runs.c.status == QUEUED)
        if principal is not None:
            query = query.where(runs.c.owner == principal)
        if replica is not None:
            query = query.where(runs.c.lease_owner == replica)
        query = query.order_by(runs.c.priority.desc(), runs.c.queued_at.asc().nulls_last(),
                               runs.c.run_id.asc()).limit(limit)
        return await self._records("queued", query)

    async def queue_position(self, run_id: str) -> int | None:
        check_text("run_id", run_id)
        me, other = runs.alias("me"), runs.alias("other")
        same_priority_ahead = sa.or_(
            # queued_at NULL sorts last within its priority (as queued() orders it).
            sa.and_(me.c.queued_at.is_(None),
                    sa.or_(other.c.queued_at.is_not(None), other.c.run_id < me.c.run_id)),
            sa.and_(me.c.queued_at.is_not(None), other.c.queued_at.is_not(None),
                    sa.or_(other.c.queued_at < me.c.queued_at,
                           sa.and_(other.c.queued_at == me.c.queued_at, other.c.run_id < me.c.run_id))),
        )
        ahead = (sa.select(sa.func.count()).select_from(other)
                 .where(other.c.status == QUEUED,
                        sa.or_(other.c.priority > me.c.priority,
                               sa.and_(other.c.priority == me.c.priority, same_priority_ahead)))
                 .correlate(me).scalar_subquery())
        query = sa.select(ahead).select_from(me).where(me.c.run_id == run_id, me.c.status == QUEUED)
        reader, _ = self._engines()
        with self._translated("queue_position"):
            async with reader.connect() as conn:
                value = (await conn.execute(query)).scalar()
        return None if value is None else int(value) + 1

    async def queue_stats(self) -> tuple[int, float | None]:
        query = sa.select(sa.func.count(), sa.func.min(runs.c.queued_at)).where(runs.c.status == QUEUED)
        reader, _ = self._engines()
        with self._translated("queue_stats"):
            async with reader.connect() as conn:
                depth, oldest = (await conn.execute(query)).one()
        return int(depth), None if oldest is None else float(oldest)

    # --- history ----------------------------------------------------------------------------------

    async def sessions(self, *, owner: str | None = None, provider: str | None = None, node: str | None = None,
                       before: Cursor | None = None, limit: int = 100) -> list[SessionRecord]:
        where = _run_filters(owner=owner, provider=provider, node=node)
        cursor = check_cursor(before)
        if check_limit(limit) == 0:
            return []
        # The matching runs, each ranked in its session (1 = the latest), with the session's count and
        # first time; the latest non-empty provider_session_id joined from a second ranking.
        f = sa.select(runs.c.session_id, runs.c.run_id, runs.c.created_at, runs.c.status, runs.c.provider,
                      runs.c.owner, runs.c.node_address, runs.c.provider_session_id).where(*where).cte("f")
        latest_first = (f.c.created_at.desc(), f.c.run_id.desc())
        ranked = sa.select(
            f, sa.func.row_number().over(partition_by=f.c.session_id, order_by=latest_first).label("rn"),
            sa.func.count().over(partition_by=f.c.session_id).label("n_runs"),
            sa.func.min(f.c.created_at).over(partition_by=f.c.session_id).label("first_at"),
        ).cte("ranked")
        psid = sa.select(
            f.c.session_id, f.c.provider_session_id,
            sa.func.row_number().over(partition_by=f.c.session_id, order_by=latest_first).label("rn"),
        ).where(f.c.provider_session_id != "").cte("psid")
        query = (sa.select(ranked.c.session_id, ranked.c.provider, ranked.c.owner, ranked.c.n_runs,
                           ranked.c.run_id, ranked.c.status, ranked.c.first_at, ranked.c.created_at,
                           sa.func.coalesce(psid.c.provider_session_id, "").label("psid"), ranked.c.node_address)
                 .select_from(ranked.outerjoin(psid, sa.and_(psid.c.session_id == ranked.c.session_id,
                                                             psid.c.rn == 1)))
                 .where(ranked.c.rn == 1))
        if cursor is not None:
            query = query.where(sa.or_(ranked.c.created_at < cursor[0],
                                       sa.and_(ranked.c.created_at == cursor[0], ranked.c.session_id < cursor[1])))
        query = query.order_by(ranked.c.created_at.desc(), ranked.c.session_id.desc()).limit(limit)
        reader, _ = self._engines()
        with self._translated("sessions"):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [SessionRecord(session_id=str(r.session_id), provider=str(r.provider), owner=str(r.owner),
                              runs=int(r.n_runs), last_run_id=str(r.run_id), last_status=str(r.status),
                              first_at=float(r.first_at), last_at=float(r.created_at),
                              provider_session_id=str(r.psid), node=str(r.node_address)) for r in rows]

    # --- inference endpoint leases ---------------------------------------------------------------

    async def put_endpoint_lease(self, rec: EndpointLeaseRecord) -> None:
        cols = check_endpoint_lease(rec)
        _, writer = self._engines()
        insert = (pg_dialect.insert(endpoint_leases) if self._sqlite_path is None
                  else sqlite_dialect.insert(endpoint_leases))
        stmt = insert.values(**cols).on_conflict_do_update(
            index_elements=[endpoint_leases.c.ref], set_={k: v for k, v in cols.items() if k != "ref"})
        with self._translated("put_endpoint_lease"):
            async with writer.begin() as conn:
                await conn.execute(stmt)

    async def get_endpoint_lease(self, ref: str) -> EndpointLeaseRecord | None:
        key = check_lease_ref(ref)
        reader, _ = self._engines()
        with self._translated("get_endpoint_lease"):
            async with reader.connect() as conn:
                row = (await conn.execute(sa.select(endpoint_leases).where(endpoint_leases.c.ref == key))).first()
        return endpoint_lease_from_columns(dict(row._mapping)) if row is not None else None

    async def delete_endpoint_lease(self, ref: str) -> bool:
        key = check_lease_ref(ref)
        _, writer = self._engines()
        with self._translated("delete_endpoint_lease"):
            async with writer.begin() as conn:
                result = await conn.execute(sa.delete(endpoint_leases).where(endpoint_leases.c.ref == key))
        return bool(result.rowcount)

    async def expired_endpoint_leases(self, *, now: float, limit: int = 500) -> list[str]:
        at = check_time("now", now)
        if check_limit(limit) == 0:
            return []
        query = (sa.select(endpoint_leases.c.ref).where(endpoint_leases.c.expires_at <= at)
                 .order_by(endpoint_leases.c.expires_at, endpoint_leases.c.ref).limit(limit))
        reader, _ = self._engines()
        with self._translated("expired_endpoint_leases"):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [str(r.ref) for r in rows]

    # --- events -----------------------------------------------------------------------------------

    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                            fence: Lease | None = None) -> None:
        check_chunk(run_id, first_seq, last_seq, data)
        fenced = check_fence(fence)
        chunk = bytes(data)
        with self._translated("append_events"):
            await self._sync_op(lambda conn: self._append_in(conn, run_id, first_seq, last_seq, chunk, fenced),
                                write=True)

    async def end_run(self, run_id: str, first_seq: int, last_seq: int, data: bytes, *,
                      fence: Lease | None = None, expect_status: StatusFilter | None = None,
                      **fields: Any) -> None:
        cols = check_update(fields)
        check_chunk(run_id, first_seq, last_seq, data)
        fenced, expect = check_expect(fence, expect_status)
        chunk = bytes(data)

        def both(conn: sa.Connection) -> None:
            # The compare-and-set first (its UPDATE keeps the row locked to the commit), then the append:
            # either raising rolls the other back.
            self._update_in(conn, run_id, cols, fenced, expect)
            self._append_in(conn, run_id, first_seq, last_seq, chunk, fenced)

        with self._translated("end_run"):
            await self._sync_op(both, write=True)

    def _append_in(self, conn: sa.Connection, run_id: str, first_seq: int, last_seq: int,
                         data: bytes, fence: Lease | None = None, also: dict[str, Any] | None = None) -> None:
        """Append one chunk; ``also``: more (checked) columns for the run's row, written with it.

        The common case is two statements: one UPDATE of the run's row whose WHERE holds the fence and
        "the chunk starts after the log" (atomic like :meth:`_update_in`: the row stays locked until
        commit, so a take_lease() by another replica cannot slip in between) and returns the held
        bytes, then the INSERT. Only when that UPDATE matched nothing is the row read, to say why
        (unknown run, lost lease, a retried chunk already held, an overlap)."""
        now = time.time()
        fast = (sa.update(runs).where(runs.c.run_id == run_id, runs.c.last_seq < first_seq)
                .values({**(also or {}), "last_seq": last_seq, "held_bytes": runs.c.held_bytes + len(data),
                         "updated_at": now})
                .returning(runs.c.held_bytes, runs.c.first_held_seq))
        if fence is not None:
            fast = fast.where(runs.c.lease_owner == fence.owner, runs.c.lease_token == fence.token)
        moved = conn.execute(fast).first()
        if moved is not None:
            conn.execute(sa.insert(run_events).values(
                run_id=run_id, first_seq=first_seq, last_seq=last_seq, nbytes=len(data), data=data))
            held = int(moved.held_bytes)
            if held > self.history_max_bytes:
                first_held, held = self._trim_in(conn, run_id, int(moved.first_held_seq), held)
                conn.execute(sa.update(runs).where(runs.c.run_id == run_id).values(
                    first_held_seq=first_held, held_bytes=held))
            return
        row = conn.execute(
            sa.select(runs.c.last_seq, runs.c.first_held_seq, runs.c.held_bytes, runs.c.lease_owner,
                      runs.c.lease_token, runs.c.status)
            .where(runs.c.run_id == run_id).with_for_update()).first()
        if row is None:
            raise RunNotFound(f"run {run_id} is not recorded")
        lost = lease_lost(run_id, fence, None, owner=row.lease_owner, token=int(row.lease_token), status=row.status)
        if lost is not None:
            raise lost
        held_last = int(row.last_seq)
        if last_seq <= held_last:
            # Already held (a retried write whose commit did land): appending is idempotent; the
            # columns that came with it are still written.
            if also:
                self._update_in(conn, run_id, dict(also), fence)
            return
        if first_seq <= held_last:
            raise overlap_error(run_id, first_seq, held_last)
        # The row would match now: it changed between the two statements (PostgreSQL, another writer).
        raise LeaseLost(f"run {run_id} changed while it was written: try again", details={"run_id": run_id})

    def _trim_in(self, conn: sa.Connection, run_id: str, first_held: int, held: int) -> tuple[int, int]:
        """The history bound: drop the oldest chunks until the log fits (the newest too if it alone is
        bigger); the new first_held_seq (where the log now starts, for a typed replay_gap) and held bytes."""
        while held > self.history_max_bytes:
            oldest = conn.execute(
                sa.select(run_events.c.last_seq, run_events.c.nbytes).where(run_events.c.run_id == run_id)
                .order_by(run_events.c.last_seq).limit(_TRIM_BATCH)).all()
            if not oldest:
                break
            cut = None
            for chunk_last, nbytes in oldest:
                if held <= self.history_max_bytes:
                    break
                held -= int(nbytes)
                cut = int(chunk_last)
            if cut is not None:
                conn.execute(sa.delete(run_events).where(
                    run_events.c.run_id == run_id, run_events.c.last_seq <= cut))
                first_held = cut + 1
        return first_held, held

    async def events_after(self, run_id: str, after_seq: int) -> list[tuple[int, int, bytes]]:
        check_text("run_id", run_id)
        after = check_seq("after_seq", after_seq)
        reader, _ = self._engines()
        query = (sa.select(run_events.c.first_seq, run_events.c.last_seq, run_events.c.data)
                 .where(run_events.c.run_id == run_id, run_events.c.last_seq > after)
                 .order_by(run_events.c.last_seq))
        with self._translated("events_after"):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [(int(first), int(last), bytes(data)) for first, last, data in rows]

    async def prune(self, ended_before: float, *, max_log_bytes: int | None = None) -> int:
        cutoff = check_time("ended_before", ended_before)
        budget = check_max_bytes(max_log_bytes)
        ended = sa.and_(runs.c.ended_at.is_not(None), runs.c.ended_at < cutoff)
        _, writer = self._engines()
        with self._translated("prune"):
            async with writer.begin() as conn:
                await conn.execute(sa.delete(run_events).where(
                    run_events.c.run_id.in_(sa.select(runs.c.run_id).where(ended))))
                result = await conn.execute(sa.delete(runs).where(ended))
                if budget is not None:
                    await self._trim_ended_logs(conn, budget)
        return int(result.rowcount)

    async def _trim_ended_logs(self, conn: AsyncConnection, budget: int) -> None:
        """Drop the oldest ended runs' event logs until the ended runs' logs hold at most ``budget`` bytes."""
        has_log = sa.and_(runs.c.ended_at.is_not(None), runs.c.held_bytes > 0)
        total = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(runs.c.held_bytes), 0))
                                    .where(has_log))).scalar()
        excess = int(total or 0) - budget
        while excess > 0:
            oldest = (await conn.execute(
                sa.select(runs.c.run_id, runs.c.held_bytes).where(has_log)
                .order_by(runs.c.ended_at, runs.c.run_id).limit(_TRIM_BATCH))).all()
            if not oldest:
                break
            dropped = []
            for run_id, nbytes in oldest:
                if excess <= 0:
                    break
                dropped.append(str(run_id))
                excess -= int(nbytes)
            await conn.execute(sa.delete(run_events).where(run_events.c.run_id.in_(dropped)))
            await conn.execute(sa.update(runs).where(runs.c.run_id.in_(dropped)).values(
                first_held_seq=runs.c.last_seq + 1, held_bytes=0))

    async def log_bytes(self) -> int:
        reader, _ = self._engines()
        with self._translated("log_bytes"):
            async with reader.connect() as conn:
                total = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(runs.c.held_bytes), 0)))).scalar()
        return int(total or 0)

    async def write_batch(self, ops: Sequence[BatchOp]) -> list[AsmError]:
        if not ops:
            return []
        with self._translated("write_batch"):
            return await self._sync_op(lambda conn: self._write_batch_in(conn, ops), write=True)

    def _write_batch_in(self, conn: sa.Connection, ops: Sequence[BatchOp]) -> list[AsmError]:
        skipped: list[tuple[int, AsmError]] = []
        # In run_id order (stable: one run's ops keep theirs): row locks are taken in the order
        # renew_leases takes them, so the two never deadlock. Skipped ops are reported in the
        # order they were given.
        ordered = sorted(enumerate(ops), key=lambda pair: pair[1].run_id)
        merged: set[int] = set()  # indexes of updates written with the chunk before them
        for at, (index, op) in enumerate(ordered):
            if index in merged:
                continue
            # An op's own error (unknown run, overlap, a lost lease) is found by a SELECT or an
            # UPDATE that matched nothing before anything is written for it, so it never aborts
            # the transaction the other ops are in.
            try:
                if isinstance(op, EventsOp):
                    # The run's plain update right after its chunk (a relayed batch's progress, as
                    # the writer queues them) goes into the chunk's UPDATE of the row: one
                    # statement fewer. Should the chunk fail, the update is written on its own.
                    also = _plain_update_after(ordered, at)
                    self._append_in(conn, op.run_id, op.first_seq, op.last_seq, op.data,
                                    check_fence(op.fence), also)
                    if also is not None:
                        merged.add(ordered[at + 1][0])
                else:
                    fence, expect = check_expect(op.fence, op.expect_status)
                    self._update_in(conn, op.run_id, check_update(dict(op.fields)), fence, expect)
            except (RunNotFound, RunExists, LeaseLost, InvalidRecord) as exc:
                exc.details.setdefault("run_id", op.run_id)
                skipped.append((index, exc))
        return [exc for _, exc in sorted(skipped, key=lambda pair: pair[0])]


def _plain_update_after(ordered: Sequence[tuple[int, BatchOp]], at: int) -> dict[str, Any] | None:
    """The checked columns of the update right after the chunk at ``at`` when it is the same run's,
    with the same fence and no expected status (it may be written with the chunk), else None."""
    if at + 1 >= len(ordered):
        return None
    chunk, nxt = ordered[at][1], ordered[at + 1][1]
    if not isinstance(nxt, UpdateOp) or nxt.run_id != chunk.run_id or nxt.fence != chunk.fence \
            or nxt.expect_status is not None:
        return None
    try:
        return check_update(dict(nxt.fields))
    except InvalidRecord:
        return None  # written on its own, to be refused on its own


def _run_filters(*, status: StatusFilter | None = None, owner: str | None = None, session_id: str | None = None,
                 provider: str | None = None, node: str | None = None, since: float | None = None,
                 until: float | None = None) -> list[sa.ColumnElement[bool]]:
    """The WHERE terms of a history query (each value checked: bad input is InvalidRecord, never SQL)."""
    where: list[sa.ColumnElement[bool]] = []
    if status is not None:
        where.append(runs.c.status.in_(check_statuses("status", status)))
    for column, value in (("owner", owner), ("session_id", session_id), ("provider", provider),
                          ("node_address", node)):
        text = check_filter_text("node" if column == "node_address" else column, value, column)
        if text is not None:
            where.append(runs.c[column] == text)
    if since is not None:
        where.append(runs.c.created_at >= check_time("since", since))
    if until is not None:
        where.append(runs.c.created_at < check_time("until", until))
    return where
