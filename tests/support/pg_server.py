"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, a free port on 127.0.0.1, its unix
socket in the temp dir, stopped by PID.

    with PostgresServer.start() as pg:
        url = pg.create_database("t1")                  # postgresql://postgres:***@127.0.0.1:PORT/t1
        sock_url = pg.url("t1", socket=True)            # postgresql:///t1?host=/tmp/asm-pg-.../sock

The binaries come from ``/usr/lib/postgresql/*/bin`` (newest first), else PATH
(``scripts/install_postgres.sh`` installs Debian's package; :func:`postgres_bin_dir` is None when
they are missing, for ``pytest.skip``). initdb and the server refuse to run as root, so when we
are root they run as the Debian ``postgres`` user, or a dedicated system user created once
(``asm-pgtest``), which owns the temp dir. The cluster trusts unix-socket connections and wants
the superuser's password over TCP (scram), so both URL forms and an auth failure can be tested.
It runs without fsync (a test cluster's durability does not matter; speed does). ``stop()`` sends
SIGINT (fast shutdown) to the PID in ``postmaster.pid``, waits a bounded time, then SIGKILLs, and
removes the temp dir (``stop(remove=False)`` + ``restart()``: the server goes down and comes back).
"""

from __future__ import annotations

import getpass
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["PostgresError", "PostgresServer", "postgres_bin_dir"]

SUPERUSER = "postgres"
PASSWORD = "pg-test-secret"
_FALLBACK_USER = "asm-pgtest"


class PostgresError(RuntimeError):
    pass


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None when PostgreSQL is not installed."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for found in (shutil.which("initdb"), shutil.which("pg_ctl"), shutil.which("postgres")):
        if found:
            candidates.append(Path(os.path.realpath(found)).parent)
    for directory in candidates:
        if all((directory / name).is_file() and os.access(directory / name, os.X_OK)
               for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The non-root user the cluster runs as (None: we are not root, run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, _FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_USER],
                   check=True, capture_output=True)
    return pwd.getpwnam(_FALLBACK_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A running cluster; use :meth:`start` (a context manager that stops it)."""

    def __init__(self, bindir: Path, workdir: Path, user: pwd.struct_passwd | None) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.socket_dir = workdir
        self.user = user
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "postgres.log"
        self._databases = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def start(cls, *, timeout: float = 30.0) -> PostgresServer:
        bindir = postgres_bin_dir()
        if bindir is None:
            raise PostgresError("PostgreSQL is not installed (scripts/install_postgres.sh)")
        user = _server_user()
        workdir = Path(tempfile.mkdtemp(prefix="asm-pg-"))
        server = cls(bindir, workdir, user)
        try:
            server._initdb()
            server._serve(timeout)
            if getpass.getuser() != SUPERUSER:  # postgresql:///DB?host=... connects as the OS user
                server._client("createuser", "--superuser", getpass.getuser())
        except BaseException:
            server.stop()
            raise
        return server

    def _as_user(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        pwfile = self.workdir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.user is not None:
            for path in (self.workdir, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        done = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER, "--pwfile", str(pwfile),
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=self.workdir, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            capture_output=True, timeout=120, **self._as_user(),  # type: ignore[call-overload]
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise PostgresError(f"initdb failed ({done.returncode}):\n{done.stdout.decode()}{done.stderr.decode()}")

    def restart(self, timeout: float = 30.0) -> None:
        """Start the stopped (``stop(remove=False)``) cluster again, on the same port."""
        self._serve(timeout, port=self.port)

    def _serve(self, timeout: float, port: int | None = None) -> None:
        last = ""
        for _attempt in range(1 if port else 3):  # a free port can be taken between probing and binding it
            self.port = port or _free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
                     "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                     "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=60"],
                    cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                    start_new_session=True, **self._as_user(),  # type: ignore[call-overload]
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._ready():
                    return
                time.sleep(0.05)
            last = self.log()
            self.stop(remove=False)
            if "already in use" not in last and "could not bind" not in last:
                break
        raise PostgresError(f"postgres did not become ready:\n{last[-4000:]}")

    def _ready(self) -> bool:
        """postmaster.pid's 8th line is "ready" once the server accepts connections."""
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def stop(self, timeout: float = 10.0, *, remove: bool = True) -> None:
        """SIGINT (fast shutdown) to the postmaster's PID, SIGKILL after ``timeout``; removes the temp dir."""
        pid = self._pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pid = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        elif pid is not None:  # not our child (never expected): wait for it by polling
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- clients --------------------------------------------------------------------------------

    def _client(self, tool: str, *args: str) -> str:
        done = subprocess.run([str(self.bindir / tool), "-h", str(self.socket_dir), "-p", str(self.port),
                               "-U", SUPERUSER, *args], capture_output=True, timeout=60)
        if done.returncode != 0:
            raise PostgresError(f"{tool} {' '.join(args)} failed: {done.stderr.decode().strip()}")
        return done.stdout.decode()

    def psql(self, database: str, sql: str) -> str:
        """Run SQL through psql on the unix socket (tuples only, unaligned)."""
        return self._client("psql", "-d", database, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql)

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its TCP URL (with the superuser's password)."""
        if name is None:
            self._databases += 1
            name = f"t{os.getpid()}_{self._databases}"
        self._client("createdb", name)
        return self.url(name)

    def url(self, database: str, *, socket: bool = False, password: str = PASSWORD) -> str:
        if socket:
            return f"postgresql:///{database}?host={self.socket_dir}&port={self.port}"
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
