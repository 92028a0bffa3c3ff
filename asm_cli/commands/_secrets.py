"""A server's secrets (ASM_TOKEN, ...) out of its environment: re-execute, hand over through a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from asm_node.config import SECRET_ENV
from asm_wire import ConfigError

#: Internal: the fd of the pipe a re-executed server reads its secrets from.
_SECRETS_FD_ENV = "ASM_SECRETS_FD"
#: A pipe holds at least one page: the hand-over write can never block.
_SECRETS_MAX_BYTES = 4096


def take_secrets(argv: list[str] | None) -> dict[str, str]:
    """A server's secrets (SECRET_ENV), gone from its environment for good.

    ``/proc/<pid>/environ`` shows the environment a process was started with,
    even after it unsets a variable, to anything running as the same user (a
    run's CLI included). So a server started with ASM_TOKEN in its environment
    re-executes itself (same pid, same argv) without it, handing the values over
    through an inherited pipe that the new image reads once and closes.
    ``argv`` is None for an in-process call (nothing to re-execute: the
    secrets are only read; the CLIs never inherit them either way).
    """
    fd_text = os.environ.pop(_SECRETS_FD_ENV, None)
    if fd_text is not None:
        return _read_secrets_pipe(fd_text)
    secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if not secrets or argv is None:
        return secrets
    payload = json.dumps(secrets).encode()
    if len(payload) > _SECRETS_MAX_BYTES:
        raise ConfigError(f"{', '.join(secrets)} too long to hand over (over {_SECRETS_MAX_BYTES} bytes): "
                          "use --token-file")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, payload)
    os.close(write_fd)
    os.set_inheritable(read_fd, True)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env[_SECRETS_FD_ENV] = str(read_fd)
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own flags (-X, -W, -E ...) are kept; -P: the new image never imports from the cwd
    # (a workspace could plant a module there).
    flags_of: Callable[[], list[str]] = getattr(subprocess, "_args_from_interpreter_flags", list)
    flags = flags_of()
    if "-I" not in flags and "-P" not in flags:
        flags.append("-P")
    try:
        os.execve(sys.executable, [sys.executable, *flags, "-m", "asm_cli", *argv], env)
    except OSError as exc:
        os.close(read_fd)
        raise ConfigError(f"cannot re-execute {sys.executable!r} without {', '.join(secrets)} in its environment "
                          f"({exc.strerror}): use --token-file") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _read_secrets_pipe(fd_text: str) -> dict[str, str]:
    if not fd_text.isdigit():
        raise ConfigError(f"{_SECRETS_FD_ENV} must be a file descriptor number, got {fd_text!r}")
    fd = int(fd_text)
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, _SECRETS_MAX_BYTES + 1):
            chunks.append(chunk)
            if sum(map(len, chunks)) > _SECRETS_MAX_BYTES:
                raise ConfigError(f"{_SECRETS_FD_ENV}: more than {_SECRETS_MAX_BYTES} bytes")
        os.close(fd)
        value = json.loads(b"".join(chunks))
    except OSError as exc:
        raise ConfigError(f"cannot read the secrets handed over on fd {fd}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"the secrets handed over on fd {fd} are not a JSON object") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"the secrets handed over on fd {fd} are not a JSON object of strings")
    return {k: v for k, v in value.items() if k in SECRET_ENV}
