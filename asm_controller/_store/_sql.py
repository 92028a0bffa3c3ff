"""The SQL run store: SQLAlchemy 2 Core over asyncio, aiosqlite for SQLite and asyncpg for PostgreSQL.

One schema (``_migrations``), one pool model (SQLAlchemy's async queue pool), the same statements
on both backends. SQLite runs in WAL mode with ``synchronous=NORMAL`` (a commit is a WAL write
without fsync: durable when the process is killed, not on power loss) and every write
transaction starts with ``BEGIN IMMEDIATE`` (takes the write lock up front, so two processes never
deadlock upgrading a read lock; readers are not blocked in WAL mode). Driver failures are
translated at this edge into :class:`StoreError` with the display URL (password hidden).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from asm_controller._store._base import (
    DEFAULT_HISTORY_MAX_BYTES,
    FIELDS,
    IN_FLIGHT,
    BatchOp,
    EventsOp,
    RunExists,
    RunRecord,
    SessionRecord,
    StoreError,
    StoreLocked,
    check_chunk,
    check_limit,
    check_meta,
    check_record,
    check_text,
    check_update,
    overlap_error,
    record_from_columns,
)
from asm_controller._store._migrations import MIGRATIONS, Migration, meta, migrate_step, run_events, runs
from asm_wire import AsmError, RunNotFound

log = logging.getLogger("asm_controller.store")

_RECORD_COLUMNS = [runs.c[name] for name in FIELDS]
#: Oldest chunks looked at per round when the history bound drops some.
_TRIM_BATCH = 256


class SqlStore:
    """A RunStore in SQLite or PostgreSQL (see :func:`asm_controller.open_store` for the URL forms)."""

    def __init__(self, url: sa.URL, *, display_url: str, sqlite_path: Path | None = None,
                 history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES, connect_timeout_s: float = 5.0,
                 migrations: Sequence[Migration] = MIGRATIONS) -> None:
        self.url = display_url
        self.history_max_bytes = history_max_bytes
        self._sa_url = url
        self._sqlite_path = sqlite_path
        self._connect_timeout_s = connect_timeout_s
        self._migrations = tuple(migrations)
        self._engine: AsyncEngine | None = None
        self._wengine: AsyncEngine | None = None
        self._claim_fd: int | None = None
        self._claim_conn: AsyncConnection | None = None

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
        except BaseException:
            await self.close()
            raise

    async def claim(self) -> None:
        """Make this process the store's only controller (until close); StoreLocked (``store_in_use``) if
        another holds it. Two controllers on one registry would both re-attach (and end) the same runs.

        SQLite: an exclusive lock on ``PATH.lock``. PostgreSQL: a session advisory lock held on a
        connection of its own (released by the server if this process dies).
        """
        engine, _ = self._engines()
        if self._sqlite_path is not None:
            if self._claim_fd is not None:
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
                raise StoreLocked(f"another controller uses the run store {self.url} (one controller per "
                                  "registry: give each its own --state)") from None
            self._claim_fd = fd
            return
        if self._claim_conn is not None:
            return
        with self._translated("claim"):
            conn = await engine.connect()
            try:
                got = (await conn.execute(sa.text("SELECT pg_try_advisory_lock(7101976210)"))).scalar()
                await conn.commit()
            except BaseException:
                await conn.close()
                raise
        if not got:
            await conn.close()
            raise StoreLocked(f"another controller uses the run store {self.url} (one controller per "
                              "registry: give each its own --state)")
        self._claim_conn = conn

    async def close(self) -> None:
        if self._claim_fd is not None:
            os.close(self._claim_fd)  # releases the flock
            self._claim_fd = None
        if self._claim_conn is not None:
            with contextlib.suppress(Exception):
                await self._claim_conn.close()
            self._claim_conn = None
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
            busy_ms = int(self._connect_timeout_s * 1000)

            @event.listens_for(engine.sync_engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # the driver's implicit BEGIN off: ours below
                cursor = dbapi_conn.cursor()
                for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={busy_ms}"):
                    cursor.execute(f"PRAGMA {pragma}")
                cursor.close()

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: sa.Connection) -> None:
                immediate = conn.get_execution_options().get("asm_write")
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

            return engine
        return create_async_engine(
            self._sa_url, pool_pre_ping=True, pool_size=4, max_overflow=4,
            pool_timeout=max(self._connect_timeout_s, 1.0),
            connect_args={"timeout": self._connect_timeout_s, "command_timeout": 60},
        )

    def _engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        if self._engine is None or self._wengine is None:
            raise StoreError(f"the run store {self.url} is not open (call open() first)")
        return self._engine, self._wengine

    @contextlib.contextmanager
    def _translated(self, op: str) -> Iterator[None]:
        """Driver and OS failures -> StoreError naming the store (password hidden)."""
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
        _, writer = self._engines()
        with self._translated("create"):
            async with writer.begin() as conn:
                try:
                    await conn.execute(sa.insert(runs).values(**cols, held_bytes=0))
                except sa.exc.IntegrityError:  # the only constraint is the primary key
                    raise RunExists(f"run {rec.run_id} is already recorded") from None

    async def get(self, run_id: str) -> RunRecord | None:
        check_text("run_id", run_id)
        reader, _ = self._engines()
        with self._translated("get"):
            async with reader.connect() as conn:
                row = (await conn.execute(sa.select(*_RECORD_COLUMNS).where(runs.c.run_id == run_id))).first()
        return record_from_columns(dict(row._mapping)) if row is not None else None

    async def update(self, run_id: str, **fields: Any) -> None:
        cols = check_update(fields)
        check_text("run_id", run_id)
        _, writer = self._engines()
        with self._translated("update"):
            async with writer.begin() as conn:
                await self._update_in(conn, run_id, cols)

    async def _update_in(self, conn: AsyncConnection, run_id: str, cols: dict[str, Any]) -> None:
        cols.setdefault("updated_at", time.time())
        result = await conn.execute(sa.update(runs).where(runs.c.run_id == run_id).values(**cols))
        if result.rowcount == 0:
            raise RunNotFound(f"run {run_id} is not recorded")

    async def list_runs(self, *, status: str | None = None, owner: str | None = None,
                        session_id: str | None = None, provider: str | None = None, node: str | None = None,
                        since: float | None = None, until: float | None = None,
                        before: tuple[float, str] | None = None, limit: int = 1000) -> list[RunRecord]:
        if check_limit(limit) == 0:
            return []
        query = sa.select(*_RECORD_COLUMNS)
        for col, value in (("status", status), ("owner", owner), ("session_id", session_id),
                           ("provider", provider), ("node_address", node)):
            if value is not None:
                query = query.where(runs.c[col] == value)
        if since is not None:
            query = query.where(runs.c.created_at >= float(since))
        if until is not None:
            query = query.where(runs.c.created_at < float(until))
        if before is not None:
            at, rid = float(before[0]), str(before[1])
            query = query.where(sa.or_(runs.c.created_at < at, sa.and_(runs.c.created_at == at, runs.c.run_id < rid)))
        query = query.order_by(runs.c.created_at.desc(), runs.c.run_id.desc()).limit(limit)
        return await self._records("list_runs", query)

    async def sessions(self, *, owner: str | None = None, provider: str | None = None, node: str | None = None,
                       before: tuple[float, str] | None = None, limit: int = 100) -> list[SessionRecord]:
        if check_limit(limit) == 0:
            return []
        part, newest = runs.c.session_id, (runs.c.created_at.desc(), runs.c.run_id.desc())
        psid = (sa.func.first_value(sa.case((runs.c.provider_session_id != "", runs.c.provider_session_id),
                                           else_=sa.null()))
                .over(partition_by=part, order_by=((runs.c.provider_session_id == "").asc(), *newest)))
        inner = sa.select(runs.c.session_id, runs.c.provider, runs.c.owner, runs.c.run_id, runs.c.status,
                          runs.c.created_at, runs.c.node_address,
                          sa.func.row_number().over(partition_by=part, order_by=newest).label("rn"),
                          sa.func.count().over(partition_by=part).label("n"),
                          sa.func.min(runs.c.created_at).over(partition_by=part).label("first_at"),
                          psid.label("psid"))
        if owner is not None:
            inner = inner.where(runs.c.owner == owner)
        if provider is not None:
            inner = inner.where(runs.c.provider == provider)
        if node is not None:
            inner = inner.where(runs.c.session_id.in_(
                sa.select(runs.c.session_id).where(runs.c.node_address == node)))
        ranked = inner.subquery()
        query = sa.select(ranked).where(ranked.c.rn == 1)
        if before is not None:
            at, sid = float(before[0]), str(before[1])
            query = query.where(sa.or_(ranked.c.created_at < at,
                                       sa.and_(ranked.c.created_at == at, ranked.c.session_id < sid)))
        query = query.order_by(ranked.c.created_at.desc(), ranked.c.session_id.desc()).limit(limit)
        reader, _ = self._engines()
        with self._translated("sessions"):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [SessionRecord(session_id=r.session_id, provider=r.provider, owner=r.owner, runs=int(r.n),
                              last_run_id=r.run_id, last_status=r.status, first_at=float(r.first_at),
                              last_at=float(r.created_at), provider_session_id=r.psid or "", node=r.node_address)
                for r in rows]

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

    # --- events -----------------------------------------------------------------------------------

    async def append_events(self, run_id: str, first_seq: int, last_seq: int, data: bytes) -> None:
        check_chunk(run_id, first_seq, last_seq, data)
        _, writer = self._engines()
        with self._translated("append_events"):
            async with writer.begin() as conn:
                await self._append_in(conn, run_id, first_seq, last_seq, bytes(data))

    async def _append_in(self, conn: AsyncConnection, run_id: str, first_seq: int, last_seq: int,
                         data: bytes) -> None:
        row = (await conn.execute(
            sa.select(runs.c.last_seq, runs.c.first_held_seq, runs.c.held_bytes)
            .where(runs.c.run_id == run_id).with_for_update())).first()
        if row is None:
            raise RunNotFound(f"run {run_id} is not recorded")
        held_last, first_held, held = int(row.last_seq), int(row.first_held_seq), int(row.held_bytes)
        if last_seq <= held_last:
            return  # already held (a retried write whose commit did land): appending is idempotent
        if first_seq <= held_last:
            raise overlap_error(run_id, first_seq, held_last)
        await conn.execute(sa.insert(run_events).values(
            run_id=run_id, first_seq=first_seq, last_seq=last_seq, nbytes=len(data), data=data))
        held += len(data)
        # The history bound: drop the oldest chunks until the log fits (the newest too if it alone is
        # bigger); first_held_seq says where the log now starts, for a typed replay_gap.
        while held > self.history_max_bytes:
            oldest = (await conn.execute(
                sa.select(run_events.c.last_seq, run_events.c.nbytes).where(run_events.c.run_id == run_id)
                .order_by(run_events.c.last_seq).limit(_TRIM_BATCH))).all()
            if not oldest:
                break
            cut = None
            for chunk_last, nbytes in oldest:
                if held <= self.history_max_bytes:
                    break
                held -= int(nbytes)
                cut = int(chunk_last)
            if cut is not None:
                await conn.execute(sa.delete(run_events).where(
                    run_events.c.run_id == run_id, run_events.c.last_seq <= cut))
                first_held = cut + 1
        await conn.execute(sa.update(runs).where(runs.c.run_id == run_id).values(
            last_seq=last_seq, first_held_seq=first_held, held_bytes=held, updated_at=time.time()))

    async def events_after(self, run_id: str, after_seq: int) -> list[tuple[int, int, bytes]]:
        check_text("run_id", run_id)
        reader, _ = self._engines()
        query = (sa.select(run_events.c.first_seq, run_events.c.last_seq, run_events.c.data)
                 .where(run_events.c.run_id == run_id, run_events.c.last_seq > after_seq)
                 .order_by(run_events.c.last_seq))
        with self._translated("events_after"):
            async with reader.connect() as conn:
                rows = (await conn.execute(query)).all()
        return [(int(first), int(last), bytes(data)) for first, last, data in rows]

    async def prune(self, ended_before: float) -> int:
        ended = sa.and_(runs.c.ended_at.is_not(None), runs.c.ended_at < float(ended_before))
        _, writer = self._engines()
        with self._translated("prune"):
            async with writer.begin() as conn:
                await conn.execute(sa.delete(run_events).where(
                    run_events.c.run_id.in_(sa.select(runs.c.run_id).where(ended))))
                result = await conn.execute(sa.delete(runs).where(ended))
        return int(result.rowcount)

    async def write_batch(self, ops: Sequence[BatchOp]) -> list[AsmError]:
        skipped: list[AsmError] = []
        if not ops:
            return skipped
        _, writer = self._engines()
        with self._translated("write"):
            async with writer.begin() as conn:
                for op in ops:
                    # An op's own error (unknown run, overlap) is found by a SELECT before anything is
                    # written for it, so it never aborts the transaction the other ops are in.
                    try:
                        if isinstance(op, EventsOp):
                            await self._append_in(conn, op.run_id, op.first_seq, op.last_seq, op.data)
                        else:
                            await self._update_in(conn, op.run_id, check_update(dict(op.fields)))
                    except (RunNotFound, RunExists) as exc:
                        skipped.append(exc)
                    except AsmError as exc:
                        if exc.reason != "invalid_record":
                            raise
                        skipped.append(exc)
        return skipped
