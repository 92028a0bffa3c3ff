"""The one way git is run for a workspace: no shell, a timeout, a scrubbed environment, and nothing
the repository configures (hooks, fsmonitor, filter drivers, pagers) able to run a program.

The rules are in the package docstring ("No repository-controlled code"); every git command of
the git backend goes through :class:`GitRunner`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Sequence

from asm_node.workspace._model import _display
from asm_wire import ConfigError, GitFailed, GitTimeout, WorkspaceError

__all__ = ["GitRunner"]

_IDENTITY = {
    "GIT_AUTHOR_NAME": "asm-node", "GIT_AUTHOR_EMAIL": "asm-node@localhost",
    "GIT_COMMITTER_NAME": "asm-node", "GIT_COMMITTER_EMAIL": "asm-node@localhost",
}
# The variables that say where the operator's own (global, system) git config is.
_OPERATOR_CONFIG_ENV = frozenset({"HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
                                  "GIT_CONFIG_NOSYSTEM", "PREFIX"})

# Every git command runs with these: nothing configured in the repository (or by the agent's user)
# can make git run a program. Filter drivers are disabled per name (see GitRunner._filter_overrides);
# diffs use --no-ext-diff --no-textconv; commit-tree --no-gpg-sign.
_SAFE_CONFIG = (
    "-c", "core.quotepath=off", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null",
    "-c", "core.attributesFile=/dev/null", "-c", "core.pager=cat",
    "-c", "commit.gpgSign=false", "-c", "gc.auto=0", "-c", "maintenance.auto=false",
    "-c", "safe.bareRepository=explicit", "-c", "core.untrackedCache=false",
)


class GitRunner:
    """Runs git hardened (see the module docstring); thread-safe, shared by every repository."""

    def __init__(self, git: str = "git", git_timeout_s: float = 120.0) -> None:
        self.git = git
        self.git_timeout_s = git_timeout_s
        self._lock = threading.Lock()
        self._operator_cfg: tuple[list[str], frozenset[str]] | None = None
        # An empty private HOME: git finds no ~/.gitconfig or ~/.config/git/attributes of the agent's user.
        self._home = tempfile.mkdtemp(prefix="asm-git-home-")
        weakref.finalize(self, shutil.rmtree, self._home, True)

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        """A scrubbed environment: nothing of the agent's (no ``ASM_TOKEN``), no user or system git config."""
        env = {
            "PATH": os.environ.get("PATH") or os.defpath, "HOME": self._home, "XDG_CONFIG_HOME": self._home,
            "LC_ALL": "C", "LANG": "C", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ATTR_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat",
        }
        env.update(extra or {})
        return env

    def _cmd(self, cwd: str, args: Sequence[str | bytes], overrides: Sequence[str] = ()) -> list[str | bytes]:
        return [self.git, "--no-pager", *_SAFE_CONFIG, *self.operator()[0], *overrides, "-C", cwd, *args]

    def operator(self) -> tuple[list[str], frozenset[str]]:
        """(``-c safe.directory=..`` options, filter driver names) from the operator's own global/system config.

        Our git never reads that config (it would bring the operator's filters, hooks and helpers), but
        the ``safe.directory`` entries the operator set are honoured, and filter drivers configured there
        (``git lfs install``) mean the real index may hold filtered blobs: see ``GitBackend._capture_tree``.
        Read once; reading config runs nothing.
        """
        with self._lock:
            if self._operator_cfg is not None:
                return self._operator_cfg
        safe: list[str] = []
        names: set[str] = set()
        # Only what locates the operator's config files: no secret of the agent's reaches this git either.
        env = {k: v for k, v in os.environ.items() if k in _OPERATOR_CONFIG_ENV}
        env.update(LC_ALL="C", GIT_TERMINAL_PROMPT="0", PATH=os.environ.get("PATH") or os.defpath)
        for scope in ("--system", "--global"):
            for key, value in self._config_entries(["config", scope, "--null", "--get-regexp",
                                                    r"^(safe\.directory|filter\.)"], "/", env):
                if key == "safe.directory":
                    safe += ["-c", f"safe.directory={value}"]
                elif key.startswith("filter."):
                    names.add(key[len("filter."):].rpartition(".")[0])
        with self._lock:
            self._operator_cfg = (safe, frozenset(names))
            return self._operator_cfg

    def _config_entries(self, args: list[str], cwd: str, env: dict[str, str]) -> list[tuple[str, str]]:
        try:
            res = subprocess.run([self.git, *args], cwd=cwd, env=env, capture_output=True, stdin=subprocess.DEVNULL,
                                 timeout=self.git_timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            return []  # no git, or none usable: the snapshot's own git call reports it
        out: list[tuple[str, str]] = []
        for entry in res.stdout.split(b"\0") if res.returncode == 0 else []:
            key, _, value = entry.partition(b"\n")
            if key:
                out.append((key.decode("utf-8", "replace"), value.decode("utf-8", "surrogateescape")))
        return out

    def filter_names(self, cwd: str) -> list[str]:
        """Names of the filter drivers the repository's own config defines (``filter.<name>.*``)."""
        res = subprocess.run(self._cmd(cwd, ["config", "--null", "--get-regexp", r"^filter\."]), capture_output=True,
                             env=self._env(None), timeout=self.git_timeout_s, stdin=subprocess.DEVNULL)
        if res.returncode not in (0, 1):  # 1: no such key
            raise _git_failed(["config"], cwd, res.returncode, res.stderr)
        names = {entry.partition(b"\n")[0][len(b"filter."):].rpartition(b".")[0]
                 for entry in res.stdout.split(b"\0") if entry}
        for name in names:
            if b"=" in name or b"\n" in name:
                raise ConfigError(f"the repository of {cwd!r} defines a filter driver named {_display(name)!r}, "
                                  "which cannot be disabled on git's command line: refusing to run git there",
                                  reason="unsafe_git_config")
        return sorted(os.fsdecode(n) for n in names)

    def _filter_overrides(self, cwd: str) -> list[str]:
        """``-c`` options that turn every filter driver the repository defines into a no-op.

        Read right before *every* git command, not only ``add`` and ``checkout-index``: any command
        that writes the index (``write-tree``) re-hashes "racily clean" entries through the clean
        filter. Reading it each time also disables a driver added to ``.git/config`` since the last
        command.
        """
        out: list[str] = []
        for name in self.filter_names(cwd):
            for var, value in (("clean", ""), ("smudge", ""), ("process", ""), ("required", "false")):
                out += ["-c", f"filter.{name}.{var}={value}"]
        return out

    def run(self, cwd: str, args: Sequence[str | bytes], *, input: bytes | None = None,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        try:
            overrides = self._filter_overrides(cwd)
            res = subprocess.run(self._cmd(cwd, args, overrides), input=input, capture_output=True,
                                 env=self._env(env), timeout=self.git_timeout_s,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise ConfigError(f"git executable {self.git!r} is not available on this node", reason="git_missing") from exc
        except subprocess.TimeoutExpired as exc:
            raise GitTimeout(f"git {_subcommand(args)!s} in {cwd!r} timed out after {self.git_timeout_s:g}s") from exc
        except OSError as exc:
            raise GitFailed(f"cannot run git in {cwd!r}: {exc}") from exc
        if check and res.returncode != 0:
            raise _git_failed(args, cwd, res.returncode, res.stderr)
        return res

    def capped(self, cwd: str, args: Sequence[str], limit: int) -> tuple[bytes, bool]:
        """Run git and read at most ``limit`` bytes of its stdout (then kill it): (data, truncated)."""
        timed_out: list[bool] = []
        with tempfile.TemporaryFile() as err:
            try:
                overrides = self._filter_overrides(cwd)
                proc = subprocess.Popen(self._cmd(cwd, args, overrides), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=err, env=self._env(None))
            except FileNotFoundError as exc:
                raise ConfigError(f"git executable {self.git!r} is not available on this node",
                                  reason="git_missing") from exc
            except subprocess.TimeoutExpired as exc:
                raise GitTimeout(f"git config in {cwd!r} timed out after {self.git_timeout_s:g}s") from exc
            except OSError as exc:
                raise GitFailed(f"cannot run git in {cwd!r}: {exc}") from exc

            def kill() -> None:
                timed_out.append(True)
                proc.kill()

            timer = threading.Timer(self.git_timeout_s, kill)
            timer.start()
            chunks: list[bytes] = []
            size = 0
            over = False
            try:
                assert proc.stdout is not None
                with proc.stdout:
                    while chunk := proc.stdout.read(min(1 << 16, limit + 1 - size)):
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > limit:
                            over = True
                            proc.kill()
                            break
                rc = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if timed_out:
                raise GitTimeout(f"git {_subcommand(args)} in {cwd!r} timed out after {self.git_timeout_s:g}s")
            if not over and rc != 0:
                err.seek(0)
                raise _git_failed(args, cwd, rc, err.read())
        return b"".join(chunks), over


def _subcommand(args: Sequence[str | bytes]) -> str:
    """The git subcommand in ``args`` (after any global ``--option``)."""
    for arg in args:
        text = os.fsdecode(arg)
        if not text.startswith("-"):
            return text
    return ""


def _git_failed(args: Sequence[str | bytes], cwd: str, rc: int, stderr: bytes) -> WorkspaceError | ConfigError:
    tail = stderr.decode("utf-8", "replace").strip()[-2000:]
    if "dubious ownership" in tail:
        return _unsafe_repository(cwd)
    return GitFailed(f"git {_subcommand(args)} failed in {cwd!r} (exit {rc}): {tail or 'no message'}")


def _unsafe_repository(cwd: str) -> ConfigError:
    return ConfigError(
        f"the git repository of {cwd!r} is owned by another user than the node agent's, so git refuses it "
        "(safe.directory): the node never overrides that; the operator can allow it for the agent's user with "
        "`git config --global --add safe.directory <repository>`, or use backend \"hash\"",
        reason="git_unsafe_repository")
