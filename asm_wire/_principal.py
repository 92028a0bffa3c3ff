"""Who is calling: principals, the tokens file, ownership checks and the audit log.

A *principal* is the authenticated identity of a caller: the name of the token
it presented (``--tokens-file``: ``NAME:TOKEN[:admin]`` per line; the single
``--token-file``/``ASM_TOKEN`` token is the admin principal ``default``), or the
subject of its verified client certificate under mutual TLS (``cn:<CN>``).
With no authentication configured at all every caller, and every in-process
caller (an embedded node), is the admin principal ``anonymous``: exactly the
behaviour before principals existed.

The gRPC layer resolves the principal per call and puts it in a
:class:`contextvars.ContextVar`; the NodeApi implementations read it with
:func:`current_principal`, so the protocol's method signatures stay unchanged.
Runs carry their owner; a non-admin principal sees and touches only its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asm_wire._errors import ConfigError, PermissionDenied

#: Shortest token a tokens file accepts (bytes): long enough that guessing is hopeless.
MIN_TOKEN_BYTES = 16
#: The principal of the single ``--token-file``/``ASM_TOKEN`` token.
DEFAULT_PRINCIPAL = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# A token travels in an HTTP/2 header and the file is ':'-separated: visible ASCII, no ':'.
_TOKEN = re.compile(r"[!-9;-~]+")


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False


#: No authentication configured (or an in-process caller): one admin, as before principals existed.
ANONYMOUS = Principal("anonymous", admin=True)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("asm_principal", default=ANONYMOUS)
_method: contextvars.ContextVar[str] = contextvars.ContextVar("asm_method", default="")


def current_principal() -> Principal:
    return _current.get()


def current_method() -> str:
    """The gRPC method of the current call ("" outside one); for audit lines."""
    return _method.get()


@contextlib.contextmanager
def acting_as(principal: Principal, method: str = "") -> Iterator[Principal]:
    """Run the block as ``principal`` (the gRPC layer, and tests of in-process agents)."""
    tok, mtok = _current.set(principal), _method.set(method)
    try:
        yield principal
    finally:
        with contextlib.suppress(ValueError):  # reset from another context (a finalized generator)
            _current.reset(tok)
            _method.reset(mtok)


def may_access(owner: str) -> bool:
    p = _current.get()
    return p.admin or p.name == owner


def check_owner(owner: str, what: str) -> None:
    """PermissionDenied unless the current principal owns ``what`` or is an admin (the owner is not named)."""
    if not may_access(owner):
        raise PermissionDenied(f"{what} belongs to another principal ({_current.get().name} may not use it)")


def require_admin(action: str) -> None:
    p = _current.get()
    if not p.admin:
        raise PermissionDenied(f"{action} needs an admin principal ({p.name} is not one)")


# -- tokens ----------------------------------------------------------------------------


class TokenTable:
    """Named bearer tokens; :meth:`match` compares against every one (no early exit)."""

    def __init__(self, entries: Sequence[tuple[Principal, str]]) -> None:
        self._entries = [(p, f"Bearer {tok}".encode()) for p, tok in entries]

    @classmethod
    def single(cls, token: str) -> TokenTable:
        return cls([(Principal(DEFAULT_PRINCIPAL, admin=True), token)])

    @property
    def principals(self) -> list[Principal]:
        return [p for p, _ in self._entries]

    def match(self, presented: bytes) -> Principal | None:
        """The principal whose ``Bearer <token>`` equals ``presented``; constant time in which one matched."""
        found: Principal | None = None
        for principal, expected in self._entries:
            if hmac.compare_digest(presented, expected) and found is None:
                found = principal
        return found

    def __repr__(self) -> str:
        return f"TokenTable({', '.join(p.name for p in self.principals)})"  # never the tokens


def parse_tokens(text: str, source: str = "tokens file") -> list[tuple[Principal, str]]:
    """``NAME:TOKEN`` or ``NAME:TOKEN:admin`` per line; ``#`` comments and blank lines ignored.

    Errors name the line, never the token.
    """
    out: list[tuple[Principal, str]] = []
    names: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        where = f"{source} line {lineno}"
        if len(fields) not in (2, 3):
            raise ConfigError(f"{where}: expected NAME:TOKEN or NAME:TOKEN:admin")
        name, token = fields[0].strip(), fields[1].strip()
        role = fields[2].strip() if len(fields) == 3 else ""
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: invalid principal name (1-64 characters of [A-Za-z0-9._@-])")
        if role not in ("", "admin"):
            raise ConfigError(f"{where}: unknown role (the only role is 'admin')")
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"{where}: the token must be visible ASCII characters without ':'")
        if len(token.encode()) < MIN_TOKEN_BYTES:
            raise ConfigError(f"{where}: the token is shorter than {MIN_TOKEN_BYTES} bytes")
        if name in names:
            raise ConfigError(f"{where}: principal {name!r} is already defined on line {names[name]}")
        if token in tokens:
            raise ConfigError(f"{where}: the same token as line {tokens[token]} (each principal needs its own)")
        names[name], tokens[token] = lineno, lineno
        out.append((Principal(name, admin=role == "admin"), token))
    if not out:
        raise ConfigError(f"{source} defines no token")
    return out


def load_tokens(token: str | None, tokens_file: Path | None) -> TokenTable | None:
    """The server's token table: the tokens file's principals plus the single token as ``default`` (admin)."""
    entries: list[tuple[Principal, str]] = []
    if tokens_file is not None:
        try:
            text = tokens_file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read tokens file {tokens_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"tokens file {tokens_file} is not UTF-8 text") from None
        entries = parse_tokens(text, f"tokens file {tokens_file}")
    if token:
        if any(p.name == DEFAULT_PRINCIPAL for p, _ in entries):
            raise ConfigError(f"tokens file {tokens_file} defines {DEFAULT_PRINCIPAL!r}, the single token's "
                              "principal: rename it or drop --token-file/ASM_TOKEN")
        if any(hmac.compare_digest(token, t) for _, t in entries):
            raise ConfigError(f"tokens file {tokens_file} repeats the single --token-file/ASM_TOKEN token")
        entries.append((Principal(DEFAULT_PRINCIPAL, admin=True), token))
    return TokenTable(entries) if entries else None


def cert_principal(auth_context: Mapping[str, Iterable[bytes]], admins: frozenset[str] = frozenset()) \
        -> Principal | None:
    """The principal of a verified client certificate: ``cn:<CN>``, else ``subject:<DN>``, else its hash."""
    def first(key: str) -> str:
        value = next(iter(auth_context.get(key) or ()), b"")
        return value.decode(errors="replace")

    if cn := first("x509_common_name"):
        name = f"cn:{cn}"
    elif subject := first("x509_subject"):
        name = f"subject:{subject}"
    elif pem := first("x509_pem_cert"):
        name = f"cert:{hashlib.sha256(pem.encode()).hexdigest()[:32]}"
    else:
        return None
    return Principal(name, admin=name in admins)


# -- audit -----------------------------------------------------------------------------

audit_log = logging.getLogger("asm.audit")
_UNPRINTABLE = re.compile(r"[^ -~]")


def _clean(value: Any) -> str:
    """Client-chosen text in a log line: bounded, one line, printable."""
    text = str(value)[:200]
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else "?", text) or "-"


class AuditLog:
    """Audit lines for refused calls, at most ``per_second`` a second (a flood cannot fill the disk).

    Lines beyond the budget are counted; the count is logged by the next line written after the
    window, or by a timer one second after suppression began, so a flood that simply stops is
    still accounted for.
    """

    def __init__(self, per_second: int = 20, clock: Any = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        self.per_second = per_second
        self._clock = clock
        self._schedule = schedule or _daemon_timer
        self._window = 0.0
        self._written = 0
        self._flush_pending = False
        self._lock = threading.Lock()
        self.suppressed = 0

    def record(self, principal: str, peer: str, method: str, outcome: str) -> None:
        with self._lock:
            now = self._clock()
            if now - self._window >= 1.0:
                self._window, self._written = now, 0
            if self._written >= self.per_second:
                self.suppressed += 1
                if not self._flush_pending:
                    self._flush_pending = True
                    self._schedule(1.0, self.flush)
                return
            self._written += 1
            self._flush_locked()
        audit_log.warning("audit: principal=%s peer=%s method=%s outcome=%s",
                          _clean(principal), _clean(peer), _clean(method), outcome)

    def flush(self) -> None:
        """Log how many refused calls went unlogged (nothing when none did)."""
        with self._lock:
            self._flush_pending = False
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self.suppressed:
            audit_log.warning("audit: %d refused call(s) not logged (rate limit %d/s)", self.suppressed,
                              self.per_second)
            self.suppressed = 0


def _daemon_timer(delay: float, fn: Callable[[], None]) -> None:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()


#: The process's audit log (shared by every server in it, so the budget is per process).
AUDIT = AuditLog()
