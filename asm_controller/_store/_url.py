"""open_store(): a store from its URL (the ``--state`` value of ``asm controller serve``)."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from asm_controller._store._base import DEFAULT_HISTORY_MAX_BYTES, RunStore
from asm_controller._store._memory import MemoryStore
from asm_wire import ConfigError

URL_FORMS = ("memory:", "sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH",
             "postgresql://USER:PASSWORD@HOST:PORT/DB", "postgresql:///DB?host=/SOCKET/DIR")
#: Query parameters a postgresql URL may carry (passed to asyncpg; sslmode is its ``ssl``).
_PG_QUERY = frozenset({"host", "port", "ssl", "sslmode"})


def _bad(url: str, why: str) -> ConfigError:
    return ConfigError(f"state URL {url!r}: {why}; accepted forms: {', '.join(URL_FORMS)}", reason="bad_state_url")


def open_store(url: str, *, history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
               connect_timeout_s: float = 5.0, observe: Callable[[str, float], None] | None = None) -> RunStore:
    """The store for ``url`` (not opened yet: ``await store.open()``).

    ``memory:`` keeps everything in this process; ``sqlite:///PATH`` is a file (a relative PATH
    is resolved against the current directory now; ``sqlite:////abs`` is absolute, as in
    SQLAlchemy); ``postgresql://`` is a server (``?host=/dir`` for its unix socket).
    ``history_max_bytes`` bounds each run's stored event log; ``connect_timeout_s`` bounds a
    PostgreSQL connect and how long SQLite waits for another process's write lock. ``observe(op,
    seconds)`` is called after every operation of a SQL store (op from ``STORE_OPS``: a metric's
    label), a memory store never calls it.
    """
    if not isinstance(url, str) or not url.strip():
        raise _bad(str(url), "empty")
    if isinstance(history_max_bytes, bool) or not isinstance(history_max_bytes, int) or history_max_bytes < 1:
        raise ConfigError(f"history_max_bytes must be a positive integer, not {history_max_bytes!r}")
    if not connect_timeout_s > 0:
        raise ConfigError(f"connect_timeout_s must be positive, not {connect_timeout_s!r}")
    scheme = url.split(":", 1)[0].lower()
    if url in ("memory:", "memory://"):
        return MemoryStore(history_max_bytes=history_max_bytes, observe=observe)
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or "?" in url or "#" in url:
            raise _bad(url, "a sqlite URL is sqlite:/// followed by a file path, without a host or options")
        raw = url[len("sqlite:///"):]
        if not raw or raw == ":memory:" or raw.endswith("/"):
            raise _bad(url, "a sqlite URL needs a file path (use memory: for a store in memory)")
        path = Path(os.path.abspath(raw))
        import sqlalchemy as sa

        from asm_controller._store._sql import SqlStore
        return SqlStore(sa.URL.create("sqlite+aiosqlite", database=str(path)), display_url=f"sqlite:///{path}",
                        sqlite_path=path, history_max_bytes=history_max_bytes,
                        connect_timeout_s=connect_timeout_s, observe=observe)
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        import sqlalchemy as sa

        from asm_controller._store._sql import SqlStore
        try:
            parsed = sa.make_url(url)
        except (sa.exc.ArgumentError, ValueError) as exc:
            raise _bad(url.replace(url.split("@")[0], "postgresql://***") if "@" in url else url,
                       f"not a URL ({exc})") from None
        # Unquoted for people (a socket dir reads as /run/postgresql, not %2Frun%2Fpostgresql).
        display = urllib.parse.unquote(parsed.set(drivername="postgresql").render_as_string(hide_password=True))
        if not parsed.database:
            raise _bad(display, "a postgresql URL needs a database name")
        unknown = sorted(set(parsed.query) - _PG_QUERY)
        if unknown:
            raise _bad(display, f"unsupported option(s) {', '.join(unknown)} (supported: {', '.join(sorted(_PG_QUERY))})")
        if not parsed.host and "host" not in parsed.query:
            raise _bad(display, "a postgresql URL needs a host (HOST:PORT, or ?host=/SOCKET/DIR)")
        query = dict(parsed.query)
        if "sslmode" in query:
            query["ssl"] = query.pop("sslmode")
        try:
            port = parsed.port
        except ValueError:
            raise _bad(display, "the port is not a number") from None
        del port
        sa_url = parsed.set(drivername="postgresql+asyncpg", query=query)
        return SqlStore(sa_url, display_url=display, history_max_bytes=history_max_bytes,
                        connect_timeout_s=connect_timeout_s, observe=observe)
    raise _bad(url.split("@")[-1] if "@" in url else url, "unknown scheme")
