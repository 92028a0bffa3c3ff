"""The ``shell`` provider: the prompt is one command line, run without a shell.

It is a security boundary: any client with a valid token chooses the line, and
the node runs it as its own user. So:

* The line is capped (``shell_max_prompt_bytes``) before it is parsed, then split
  POSIX-style in linear time (``shlex`` is quadratic in a token's length, and this
  runs on the event loop).
* The allow-list is a set of executables resolved once, when the provider is built:
  an absolute entry is used as given (it must be an executable file), a name is
  looked up on the node's PATH at startup. A run's argv[0] is resolved the same
  way (a path against the run's cwd, a bare name against that fixed PATH, never the
  request's env) to its real path, and it runs only if (real path, name) is one of
  the allowed executables; the operator's path is executed, not the client's. The
  name is part of the identity because multi-call binaries (busybox) pick their
  behaviour from it. An empty set runs nothing; a run may only narrow the set.
* File-reading commands (``shell_confined_commands``) get every path-like argument
  resolved against the run's cwd and refused outside the workspace roots (the run's
  cwd when the node has none), unless the operator turns that off; /proc, /sys and
  /dev are never readable through them.

Each stdout line becomes an ``assistant_delta``; the exit status becomes the
``result`` (or a ``tool_failed`` error). Shell interpolation (``/bin/sh -c``) is
off unless the node operator enables it and the run asks for it: then only the
first word is checked (and replaced by the resolved executable); arguments are
not confined, the shell can do anything the allowed command can.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from asm_node.config import DEFAULT_SHELL_CONFINED, NodeConfig
from asm_node.providers._sessions import SessionStore
from asm_node.providers.base import (
    CommandSpec,
    ExitInfo,
    LineParser,
    Provider,
    ProviderStatus,
    RunSpec,
    check_permission_mode,
    error_event,
    reject_unknown,
    result_event,
    stderr_summary,
)
from asm_wire import KIND_VALUES, AsmError, ConfigError, make_error, pb

_FORBIDDEN = ("$(", "\n", "\r", ";", "|", "&", "<", ">", "`")
_OPTIONS = {"allowed_commands", "denied_commands", "command_timeout_ms", "success_exit_codes", "interpolate"}
DEFAULT_MAX_PROMPT_BYTES = 64 * 1024
#: Never readable through a confined command, whatever the roots or the operator's opt-out.
_NEVER = (Path("/proc"), Path("/sys"), Path("/dev"))

#: An executable as the allow-list sees it: (real path, name it is invoked under).
Exe = tuple[str, str]

# One token piece per match; possessive quantifiers keep a failed match linear.
_PIECE = re.compile(r"""[ \t\r\n]++|'[^']*+'|"(?:[^"\\]|\\[\s\S])*+"|\\[\s\S]|[^ \t\r\n'"\\]++""")
_DQ_ESCAPE = re.compile(r"\\([\s\S])")
_FIRST_WORD = re.compile(r"[^ \t\r\n]+")


def split_command(line: str) -> list[str]:
    """``shlex.split(line)`` (POSIX, no comments) in linear time; the same ValueError messages."""
    words: list[str] = []
    buf: list[str] = []
    in_word = False
    pos, end = 0, len(line)
    while pos < end:
        m = _PIECE.match(line, pos)
        if m is None:  # an unterminated quote, or a backslash at the very end
            rest = line[pos:]
            if rest.startswith("\\"):
                raise ValueError("No escaped character")
            if rest.startswith('"') and re.fullmatch(r'"(?:[^"\\]|\\[\s\S])*+\\', rest):
                raise ValueError("No escaped character")
            raise ValueError("No closing quotation")
        piece = m.group()
        pos = m.end()
        first = piece[0]
        if first in " \t\r\n":
            if in_word:
                words.append("".join(buf))
                buf.clear()
                in_word = False
            continue
        in_word = True
        if first == "'":
            buf.append(piece[1:-1])
        elif first == '"':
            # Inside double quotes a backslash escapes only a backslash or a double quote.
            buf.append(_DQ_ESCAPE.sub(lambda e: e.group(1) if e.group(1) in '\\"' else e.group(0), piece[1:-1]))
        elif first == "\\":
            buf.append(piece[1])
        else:
            buf.append(piece)
    if in_word:
        words.append("".join(buf))
    return words


def _str_list(options: Mapping[str, Any], key: str) -> list[str] | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"option {key} must be a list of non-empty strings")
    return [v.strip() for v in value]


def _denied(message: str) -> AsmError:
    return make_error("guardrail_blocked", "guardrail", message, reason="command_denied")


def _fixed_path(path: str) -> str:
    """The PATH names are resolved against: absolute directories only (a relative one would
    follow whatever the current directory is)."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if os.path.isabs(d))


class ShellProvider(Provider):
    name = "shell"
    #: The common features (supported?, how), shown by `asm providers`: declared here, with the CLI.
    features: ClassVar[Mapping[str, tuple[bool, str]]] = {
            "streaming": (True, "one assistant_delta per stdout line"),
            "tools": (False, ""),
            "resume": (False, ""),
            "interrupt": (True, "SIGINT to the process group"),
            "cost": (False, ""),
            "approvals": (False, ""),
            "ollama": (False, ""),
            "steering": (False, ""),
            "mcp": (False, ""),
    }
    #: Commands keep no resumable sessions: ListProviderSessions answers none.
    session_store: ClassVar[SessionStore | None] = None
    display_name = "Shell"

    def option_names(self) -> list[str]:
        return sorted(_OPTIONS)

    def __init__(
        self,
        allowed: Sequence[str],
        denied: Sequence[str],
        allow_interpolation: bool = False,
        *,
        confined: Sequence[str] = DEFAULT_SHELL_CONFINED,
        confine_reads: bool = True,
        workspace_roots: Sequence[Path] = (),
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        path: str | None = None,
    ) -> None:
        self.path = _fixed_path(os.environ.get("PATH", os.defpath) if path is None else path)
        self.allow_interpolation = allow_interpolation
        self.confined = frozenset(confined)
        self.confine_reads = confine_reads
        self.roots = tuple(Path(os.path.realpath(r)) for r in workspace_roots)
        self.max_prompt_bytes = max_prompt_bytes
        #: Allowed executable -> the operator's path for it (what is executed).
        self.allowed: dict[Exe, str] = {}
        #: Allowed names not found on the PATH at startup (a run naming one gets cli_not_found).
        self.missing: frozenset[str] = frozenset()
        missing = set()
        for entry in allowed:
            found = self._resolve_entry(entry, "shell_allowed_commands", strict=True)
            if found is None:
                missing.add(entry.strip())
            else:
                self.allowed.setdefault(found[0], found[1])
        self.missing = frozenset(missing)
        self.denied_names, self.denied_reals = self._deny_sets(denied)

    @classmethod
    def from_config(cls, config: NodeConfig) -> ShellProvider:
        """Built from a NodeConfig (its shell_* fields and workspace roots)."""
        return cls(
            config.shell_allowed_commands, config.shell_denied_commands, config.shell_allow_interpolation,
            confined=config.shell_confined_commands, confine_reads=config.shell_confine_reads,
            workspace_roots=config.workspace_roots, max_prompt_bytes=config.shell_max_prompt_bytes,
        )

    # -- resolution ----------------------------------------------------------------------

    def _which(self, name: str) -> Exe | None:
        exe = shutil.which(name, path=self.path)
        return None if exe is None else (os.path.realpath(exe), name)

    def _resolve_entry(self, entry: str, field: str, strict: bool) -> tuple[Exe, str] | None:
        """An operator's (or a run's) list entry: an absolute path or a bare name."""
        entry = entry.strip()
        if not entry or "\0" in entry:
            raise ConfigError(f"{field}: empty or NUL-containing entry {entry!r}")
        if "/" not in entry:
            exe = shutil.which(entry, path=self.path)
            return None if exe is None else ((os.path.realpath(exe), entry), exe)
        if not os.path.isabs(entry):
            raise ConfigError(f"{field} entry {entry!r} must be a command name or an absolute path")
        real = os.path.realpath(entry)
        if not (os.path.isfile(real) and os.access(real, os.X_OK)):
            if strict:
                raise ConfigError(f"{field} entry {entry!r} is not an executable file")
            return None
        return (real, os.path.basename(entry)), entry

    def _deny_sets(self, denied: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
        """Denied names, and denied real paths (minus those an allowed executable shares: a
        multi-call binary is then refused by name, not everything it provides)."""
        names, reals = set(), set()
        for entry in denied:
            names.add(os.path.basename(entry.strip()))
            found = self._resolve_entry(entry, "denied_commands", strict=False)
            if found is not None:
                reals.add(found[0][0])
        return frozenset(names), frozenset(reals - {real for real, _ in self.allowed})

    def _resolve_word(self, word: str, cwd: str) -> Exe | None:
        """argv[0] of a run: a path against the run's cwd, a bare name against the fixed PATH."""
        if "/" in word:
            return os.path.realpath(os.path.join(cwd, word)), os.path.basename(word)
        return self._which(word)

    # -- Provider ------------------------------------------------------------------------

    def status(self, env: Mapping[str, str], probe_version: bool = True) -> ProviderStatus:
        # Commands are resolved at construction and per run; nothing to probe.
        return ProviderStatus(available=True, cli_path="", version="builtin")

    def validate_options(self, options: Mapping[str, Any], permission_mode: str) -> dict[str, Any]:
        reject_unknown(options, _OPTIONS, self.name)
        check_permission_mode(permission_mode)
        out: dict[str, Any] = {}
        out["allowed"], out["allowed_missing"] = self._narrow(_str_list(options, "allowed_commands"))
        extra_names, extra_reals = self._deny_sets(_str_list(options, "denied_commands") or [])
        out["denied_names"] = self.denied_names | extra_names
        out["denied_reals"] = self.denied_reals | extra_reals
        timeout = options.get("command_timeout_ms", 30_000)
        if isinstance(timeout, str) and timeout.isdigit():
            timeout = int(timeout)
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError("option command_timeout_ms must be a positive integer")
        out["timeout_s"] = timeout / 1000
        codes = options.get("success_exit_codes", [0])
        if isinstance(codes, str):
            try:
                codes = [int(c) for c in codes.split(",")]
            except ValueError:
                raise ConfigError("option success_exit_codes must be a list of integers") from None
        if not isinstance(codes, list) or not all(isinstance(c, int) and c >= 0 for c in codes):
            raise ConfigError("option success_exit_codes must be a list of non-negative integers")
        out["success_exit_codes"] = codes
        interpolate = options.get("interpolate", False)
        if isinstance(interpolate, str):
            interpolate = interpolate.lower() in ("1", "true", "yes", "on")
        if interpolate and not self.allow_interpolation:
            raise ConfigError("shell interpolation is disabled on this node (start it with --shell-allow-interpolation)")
        out["interpolate"] = bool(interpolate)
        return out

    def _narrow(self, entries: list[str] | None) -> tuple[frozenset[Exe], frozenset[str]]:
        """A run's allowed_commands: each entry must name an executable the node allows."""
        if entries is None:
            return frozenset(self.allowed), self.missing
        allowed: set[Exe] = set()
        missing: set[str] = set()
        for entry in entries:
            found = self._resolve_entry(entry, "allowed_commands", strict=False)
            if found is not None and found[0] in self.allowed:
                allowed.add(found[0])
            elif entry in self.missing:
                missing.add(entry)
            else:
                raise _denied(
                    f"allowed_commands entry {entry!r} is not allowed on this node: "
                    "a run can only narrow the node's allow-list"
                )
        return frozenset(allowed), frozenset(missing)

    def _executable(self, word: str, cwd: str, opts: Mapping[str, Any]) -> tuple[str, Exe]:
        """The operator's path to execute for argv[0] ``word``, or a typed refusal."""
        denied_names = opts["denied_names"]
        if os.path.basename(word) in denied_names:
            raise _denied(f"command {word!r} is denied")
        try:
            exe = self._resolve_word(word, cwd)
        except (OSError, ValueError):
            exe = None
        if exe is None:  # a bare name not on the node's PATH
            if word in opts["allowed_missing"]:
                raise make_error("cli_not_found", "provider", f"command {word!r} not found on the node's PATH",
                                 reason="provider_missing")
            raise _denied(f"command {word!r} is not in the allowed list")
        real = exe[0]
        if os.path.basename(real) in denied_names or real in opts["denied_reals"]:
            raise _denied(f"command {word!r} (resolves to {real}) is denied")
        if exe not in opts["allowed"]:
            where = f" (resolves to {real})" if "/" in word else ""
            raise _denied(f"command {word!r}{where} is not in the allowed list")
        return self.allowed[exe], exe

    def _check_paths(self, command: str, args: Sequence[str], cwd: str) -> None:
        """Every path-like argument of a confined command must resolve inside the roots."""
        roots = (self.roots or (Path(cwd),)) if self.confine_reads else None
        options_done = False
        for arg in args:
            if options_done:
                candidate: str | None = arg
            elif arg == "--":
                options_done = True
                continue
            elif arg == "-":
                continue  # stdin (/dev/null)
            elif arg.startswith("--"):
                candidate = arg.partition("=")[2] if "=" in arg else None  # --files0-from=F
            elif arg.startswith("-"):
                candidate = arg[2:] or None  # an attached value: -fFILE
            else:
                candidate = arg
            if candidate is None:
                continue
            try:
                resolved = Path(os.path.realpath(os.path.join(cwd, candidate)))
            except (OSError, ValueError):
                raise _denied(f"{command}: argument {arg!r} is not a usable path") from None
            if any(resolved == n or resolved.is_relative_to(n) for n in _NEVER):
                raise _denied(f"{command}: argument {arg!r} resolves to {str(resolved)!r}: "
                              "/proc, /sys and /dev are never readable through the shell provider")
            if roots is not None and not any(resolved == r or resolved.is_relative_to(r) for r in roots):
                where = "workspace roots" if self.roots else "run's cwd"
                raise _denied(
                    f"{command}: argument {arg!r} resolves to {str(resolved)!r}, outside the {where} "
                    f"({', '.join(str(r) for r in roots)}); the node operator can lift this with "
                    "--shell-unconfined-reads"
                )

    def build_command(self, spec: RunSpec) -> CommandSpec:
        opts = spec.options
        prompt = spec.prompt
        # Capped before anything looks at it: the cost of everything below is bounded by the cap.
        if len(prompt) > self.max_prompt_bytes or len(prompt.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            raise make_error(
                "config_invalid", "config",
                f"command line too long: {len(prompt.encode('utf-8', 'surrogatepass'))} bytes, "
                f"the node's limit is {self.max_prompt_bytes} bytes (shell_max_prompt_bytes)",
                reason="prompt_too_large",
            )
        line = prompt.strip()
        if not line:
            raise ConfigError("empty command: the shell provider runs the prompt as a command line")
        if "\0" in line:
            raise ConfigError("the command line contains a NUL byte")
        if opts["interpolate"]:
            m = _FIRST_WORD.match(line)
            assert m is not None  # line is stripped and non-empty
            exe, _ = self._executable(m.group(), spec.cwd, opts)
            # The shell runs exactly the executable that was checked, whatever its PATH says.
            argv = ["/bin/sh", "-c", shlex.quote(exe) + line[m.end():]]
        else:
            bad = [c for c in _FORBIDDEN if c in line]
            if bad:
                raise _denied(f"shell metacharacter {bad[0]!r} is not allowed (no shell interpolation)")
            try:
                argv = split_command(line)
            except ValueError as exc:
                raise ConfigError(f"cannot parse command line: {exc}") from None
            if not argv:
                raise ConfigError("empty command")
            exe, (real, name) = self._executable(argv[0], spec.cwd, opts)
            if name in self.confined or os.path.basename(real) in self.confined:
                self._check_paths(argv[0], argv[1:], spec.cwd)
            if "date" in (name, os.path.basename(real)):
                _refuse_clock_setting(argv[0], argv[1:])
            argv[0] = exe
        return CommandSpec(argv=argv, cwd=spec.cwd, env=dict(spec.env), timeout_s=opts["timeout_s"])

    def new_parser(self, spec: RunSpec) -> LineParser:
        return ShellParser(spec.options["success_exit_codes"])


def _refuse_clock_setting(command: str, args: Sequence[str]) -> None:
    """``date`` is in ASM's default allow-list to *print* the time; ``-s``/``--set`` sets the host's clock
    (a node often runs as root). Short clusters are read like getopt: ``d f r I`` take the rest as their
    value, so ``-us`` sets but ``-dsunday`` only displays."""
    for arg in args:
        if arg == "--":
            return
        if arg.startswith("--"):
            if "--set".startswith(arg.partition("=")[0]) and len(arg.partition("=")[0]) >= 4:
                raise _denied(f"{command}: {arg!r} would set the system clock; the shell provider only reads it")
        elif arg.startswith("-") and len(arg) > 1:
            for ch in arg[1:]:
                if ch == "s":
                    raise _denied(f"{command}: {arg!r} would set the system clock; the shell provider only reads it")
                if ch in "dfrI":
                    break


class ShellParser(LineParser):
    def __init__(self, success_codes: Sequence[int]) -> None:
        super().__init__()
        self.success_codes = frozenset(success_codes)

    def delta_texts(self, lines: list[bytes]) -> list[str] | None:
        """Each line a delta of its text and its newline, when they all are UTF-8 (in one decode: a
        "\n" byte is never inside a multi-byte sequence); else None (feed_lines keeps the bytes)."""
        try:
            return [t + "\n" for t in b"\n".join(lines).decode("utf-8").split("\n")] if lines else []
        except UnicodeDecodeError:
            return None

    def feed_lines(self, lines: list[bytes], out: list[pb.Event]) -> None:
        # Hot path: one delta per line. Setting the field in place avoids the copy
        # that passing a ready-made AssistantDelta to the constructor costs.
        # Lossless: a line that is valid UTF-8 is text (``content``, a ``\r`` kept);
        # any other line travels as its exact bytes in ``data`` with ``content`` empty,
        # never decoded with U+FFFD replacements.
        # All of them UTF-8 (the common case): decoded in one call. A "\n" byte is never inside a
        # multi-byte sequence, so the joined bytes decode exactly when every line does, and split back
        # into the same lines.
        if not lines:
            return
        event, kind, append = pb.Event, KIND_VALUES["assistant_delta"], out.append
        try:
            texts: list[str] | None = b"\n".join(lines).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            texts = None
        if texts is not None:
            for text in texts:
                ev = event()
                ev.kind = kind  # (set after: a keyword to the constructor costs more)
                ev.assistant_delta.content = text + "\n"
                append(ev)
            return
        for line in lines:
            ev = event(kind=kind)
            try:
                ev.assistant_delta.content = line.decode("utf-8") + "\n"
            except UnicodeDecodeError:
                ev.assistant_delta.data = line + b"\n"
            append(ev)

    def finish(self, exit: ExitInfo) -> list[pb.Event]:
        if self.terminal:
            return []
        self.terminal = True
        code = exit.returncode
        if exit.signal:
            return [error_event(f"command terminated by signal {exit.signal}", "tool_failed", "tool", exit_code=-1)]
        if code is not None and code in self.success_codes:
            return [result_event("completed", "exit", {"exit_code": code})]
        detail = stderr_summary(exit.stderr_tail)
        msg = f"command exited with status {code}" + (f": {detail}" if detail else "")
        return [error_event(msg, "tool_failed", "tool", exit_code=code if code is not None else -1)]
