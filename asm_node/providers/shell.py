"""The ``shell`` provider: the prompt is one command line, run without a shell.

The line is split into argv POSIX-style, checked against allowed/denied lists
(ASM.Options.Shell defaults; the node's lists bound what a run may ask for)
and executed directly. Each stdout line becomes an ``assistant_delta``; the
exit status becomes the ``result`` (or a ``tool_failed`` error).

Shell interpolation (``/bin/sh -c``) is off unless the node operator enables it
and the run asks for it: with it the allow-list can only see the first word.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

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
from asm_wire import KIND_VALUES, ConfigError, make_error, pb

_FORBIDDEN = ("$(", "\n", "\r", ";", "|", "&", "<", ">", "`")
_OPTIONS = {"allowed_commands", "denied_commands", "command_timeout_ms", "success_exit_codes", "interpolate"}


def _str_list(options: Mapping[str, Any], key: str) -> list[str] | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"option {key} must be a list of non-empty strings")
    return [v.strip() for v in value]


class ShellProvider(Provider):
    name = "shell"
    display_name = "Shell"

    def __init__(
        self,
        allowed: Sequence[str],
        denied: Sequence[str],
        allow_interpolation: bool = False,
    ) -> None:
        self.allowed = list(allowed)
        self.denied = list(denied)
        self.allow_interpolation = allow_interpolation

    def status(self, env: Mapping[str, str], probe_version: bool = True) -> ProviderStatus:
        # Commands are resolved per run; nothing to probe (and this is on every run's path).
        return ProviderStatus(available=True, cli_path="", version="builtin")

    def validate_options(self, options: Mapping[str, Any], permission_mode: str) -> dict[str, Any]:
        reject_unknown(options, _OPTIONS, self.name)
        check_permission_mode(permission_mode)
        out: dict[str, Any] = {}
        allowed = _str_list(options, "allowed_commands")
        denied = _str_list(options, "denied_commands")
        # A run may narrow the node's policy, never widen it.
        if self.allowed:
            out["allowed"] = [c for c in (allowed if allowed is not None else self.allowed) if c in self.allowed]
        else:
            out["allowed"] = allowed or []
        out["denied"] = sorted(set(self.denied) | set(denied or []))
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

    def _check(self, word: str, opts: Mapping[str, Any]) -> None:
        base = os.path.basename(word)
        if base in opts["denied"]:
            raise make_error("guardrail_blocked", "guardrail", f"command {base!r} is denied", reason="command_denied")
        if opts["allowed"] and base not in opts["allowed"]:
            raise make_error(
                "guardrail_blocked", "guardrail", f"command {base!r} is not in the allowed list", reason="command_denied"
            )

    def build_command(self, spec: RunSpec) -> CommandSpec:
        opts = spec.options
        line = spec.prompt.strip()
        if not line:
            raise ConfigError("empty command: the shell provider runs the prompt as a command line")
        if opts["interpolate"]:
            first = line.split(maxsplit=1)[0]
            self._check(first, opts)
            argv = ["/bin/sh", "-c", line]
        else:
            bad = [c for c in _FORBIDDEN if c in line]
            if bad:
                raise make_error(
                    "guardrail_blocked", "guardrail",
                    f"shell metacharacter {bad[0]!r} is not allowed (no shell interpolation)",
                    reason="command_denied",
                )
            try:
                argv = shlex.split(line, posix=True)
            except ValueError as exc:
                raise ConfigError(f"cannot parse command line: {exc}") from None
            if not argv:
                raise ConfigError("empty command")
            self._check(argv[0], opts)
            exe = shutil.which(argv[0], path=spec.env.get("PATH"))
            if exe is None:
                raise make_error(
                    "cli_not_found", "provider", f"command {argv[0]!r} not found on the node's PATH",
                    reason="provider_missing",
                )
            argv[0] = exe
        return CommandSpec(argv=argv, cwd=spec.cwd, env=dict(spec.env), timeout_s=opts["timeout_s"])

    def new_parser(self, spec: RunSpec) -> LineParser:
        return ShellParser(spec.options["success_exit_codes"])


class ShellParser(LineParser):
    def __init__(self, success_codes: Sequence[int]) -> None:
        super().__init__()
        self.success_codes = frozenset(success_codes)

    def feed_lines(self, lines: list[bytes], out: list[pb.Event]) -> None:
        # Hot path: one delta per line. Setting the field in place avoids the copy
        # that passing a ready-made AssistantDelta to the constructor costs.
        # Lossless: a line that is valid UTF-8 is text (``content``, a ``\r`` kept);
        # any other line travels as its exact bytes in ``data`` with ``content`` empty,
        # never decoded with U+FFFD replacements.
        event, kind, append = pb.Event, KIND_VALUES["assistant_delta"], out.append
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
