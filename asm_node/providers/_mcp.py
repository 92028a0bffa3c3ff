"""The ``mcp_servers`` option: MCP servers a run's CLI may use, validated once and rendered per CLI.

    {"lookup": {"command": "/usr/bin/python3", "args": ["server.py"], "env": {"KEY": "v"}},
     "docs": {"url": "https://mcp.example.com/mcp"}}

A ``command`` entry is a stdio server the CLI spawns (as the node's user); a ``url`` entry is a
streamable-HTTP server the CLI connects to. Nothing goes through a shell: the command and its
arguments reach the CLI as JSON (Claude ``--mcp-config``, Gemini's settings file) or as TOML
values (Codex ``-c mcp_servers.<name>.*``), each quoted by its serializer.

A server's ``env`` values are often credentials, and a process's argv is readable by every user of
the host (``ps``) and lands in the run's ``run_started`` event. So they never go on argv: Claude
and Gemini read them from a file of the run's, mode 0600 in the node's private state directory
(never the workspace), removed when the run ends (``RunSpec.files``); Codex gets each value in its
own environment and forwards it by name (``env_vars``). Only a key that the CLI's environment
already has with another value, or that two servers set differently, stays in Codex's ``env``
table on argv: forwarding it would change the CLI's own environment.

Who may set it: the option is operator-only as a whole (``CliProvider.operator_options``; a run
may set it where ``asm node serve --allow-run-option mcp_servers`` allows it). A ``command``
runs any program as the node's user, exactly what ``args`` could do; a ``url`` makes the CLI
open a connection from inside the node's network to an endpoint the client picked and hand it
tool calls built from the workspace, the same reach ``ollama_base_url`` has, which is
operator-only for that reason.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints, field_validator

from asm_wire import ConfigError

#: A server's name: it becomes part of a tool name (Claude ``mcp__<name>__<tool>``) and a TOML key.
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_SERVERS = 16
MAX_ARGS = 64
MAX_ENV = 64
MAX_VALUE_CHARS = 4096
MAX_URL_CHARS = 2048
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: A bare command name, looked up on the CLI's PATH (no slash, no leading '-').
_BARE = re.compile(r"[A-Za-z0-9_.+][A-Za-z0-9_.+-]{0,254}")
#: Why a run's CLI cannot take its mcp_servers on this node (ConfigError reason).
MCP_UNSUPPORTED = "mcp_unsupported"

_Value = Annotated[str, StringConstraints(max_length=MAX_VALUE_CHARS)]


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain a NUL byte")
    return value


class StdioServer(BaseModel):
    """A server the CLI starts: ``command`` (an absolute path or a name on PATH) with ``args`` and ``env``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    command: Annotated[str, StringConstraints(min_length=1, max_length=MAX_VALUE_CHARS)]
    args: list[_Value] = Field(default_factory=list, max_length=MAX_ARGS)
    env: dict[str, _Value] = Field(default_factory=dict, max_length=MAX_ENV)

    @field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        _no_nul(value, "command")
        if os.path.isabs(value) or _BARE.fullmatch(value):
            return value
        raise ValueError("command must be an absolute path or a bare program name (no relative path, "
                         "no leading '-', no spaces): it is run without a shell")

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        return [_no_nul(a, "an argument") for a in value]

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not _ENV_KEY.fullmatch(key):
                raise ValueError(f"env key {key[:80]!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*, <= 128)")
            _no_nul(item, f"env {key}")
        return value


class UrlServer(BaseModel):
    """A remote server the CLI connects to (streamable HTTP)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_CHARS)]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("url must not contain whitespace or control characters")
        return value


McpServer = StdioServer | UrlServer


def parse_servers(value: Any) -> dict[str, McpServer]:
    """The option's value checked: a mapping of names to one server each (ValueError otherwise)."""
    if not isinstance(value, Mapping):
        raise ValueError("mcp_servers must be an object: {name: {command, args, env} or {url}}")
    if len(value) > MAX_SERVERS:
        raise ValueError(f"mcp_servers names {len(value)} servers; at most {MAX_SERVERS}")
    out: dict[str, McpServer] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"server name {str(name)[:80]!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"server {name}: expected an object with command (and args, env) or url")
        has_cmd, has_url = "command" in spec, "url" in spec
        if has_cmd == has_url:
            raise ValueError(f"server {name}: give exactly one of command (a stdio server) or url (a remote one)")
        model: type[BaseModel] = StdioServer if has_cmd else UrlServer
        try:
            out[name] = model.model_validate(dict(spec))  # type: ignore[assignment]
        except ValueError as exc:
            raise ValueError(f"server {name}: {_first_problem(exc)}") from None
    return out


def _first_problem(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        return f"{where}: {str(e['msg']).removeprefix('Value error, ')}" if where else str(e["msg"])
    return str(exc)


# -- rendering ---------------------------------------------------------------------


def claude_config(servers: Mapping[str, McpServer]) -> str:
    """The ``--mcp-config`` JSON (``{"mcpServers": {...}}``, stdio or http entries)."""
    entries: dict[str, Any] = {}
    for name, s in servers.items():
        if isinstance(s, StdioServer):
            entries[name] = {"type": "stdio", "command": s.command, "args": list(s.args), "env": dict(s.env)}
        else:
            entries[name] = {"type": "http", "url": s.url}
    return json.dumps({"mcpServers": entries}, separators=(",", ":"))


def write_claude_config(servers: Mapping[str, McpServer], env: Mapping[str, str], run_id: str) -> str:
    """Write the run's ``--mcp-config`` file (0600, in the node's state dir) and return its path."""
    # A workspace that holds the node's state dir (cwd=$HOME) is fine here: the file gives the run's
    # agent nothing its own servers' environments do not (same user), and it is written afresh.
    return write_private(private_dir(env, "claude-mcp"), run_id, claude_config(servers))


def codex_config(servers: Mapping[str, McpServer], cli_env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """``--config`` overrides for Codex (``mcp_servers.<name>.command|args|env_vars|env|url=<TOML value>``)
    and the values to put in the CLI's environment for ``env_vars`` to forward.

    JSON strings and arrays of strings are valid TOML values; a table is written as a TOML inline
    table (env keys are checked to be bare keys), never as JSON, which Codex would take as a string."""
    given: dict[str, set[str]] = {}
    for s in servers.values():
        if isinstance(s, StdioServer):
            for k, v in s.env.items():
                given.setdefault(k, set()).add(v)
    # Forwarded by name when that changes nothing else: the CLI does not have the key with another
    # value, and every server that sets it sets the same value.
    forward = {k: next(iter(vs)) for k, vs in given.items()
               if len(vs) == 1 and cli_env.get(k, next(iter(vs))) == next(iter(vs))}
    out: list[str] = []
    for name, s in servers.items():
        if isinstance(s, StdioServer):
            out.append(f"mcp_servers.{name}.command={json.dumps(s.command)}")
            out.append(f"mcp_servers.{name}.args={json.dumps(list(s.args))}")
            names = [k for k in s.env if k in forward]
            if names:
                out.append(f"mcp_servers.{name}.env_vars={json.dumps(names)}")
            inline = {k: v for k, v in s.env.items() if k not in forward}
            if inline:
                table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in inline.items())
                out.append(f"mcp_servers.{name}.env={{{table}}}")
        else:
            out.append(f"mcp_servers.{name}.url={json.dumps(s.url)}")
    return out, forward


def gemini_entries(servers: Mapping[str, McpServer]) -> dict[str, Any]:
    """Gemini CLI ``mcpServers`` settings entries (``httpUrl`` is its streamable-HTTP transport)."""
    entries: dict[str, Any] = {}
    for name, s in servers.items():
        if isinstance(s, StdioServer):
            entries[name] = {"command": s.command, "args": list(s.args), "env": dict(s.env)}
        else:
            entries[name] = {"httpUrl": s.url}
    return entries


# -- Gemini's settings file --------------------------------------------------------

#: Where Gemini CLI reads its system settings unless GEMINI_CLI_SYSTEM_SETTINGS_PATH moves them.
GEMINI_SYSTEM_SETTINGS = "/etc/gemini-cli/settings.json"
#: Settings files of runs that ended long ago are removed when a new one is written.
STALE_AFTER_S = 24 * 3600


def secure_for_gemini(path: Path) -> str:
    """Why Gemini CLI would skip a system settings file at ``path`` ("" when it would read it).

    Gemini 0.61 reads a system settings file only when it and every directory above it are owned
    by root and not writable by group or others (its own check, repeated here so a run fails with
    the reason instead of silently running without its servers)."""
    for p in [path, *path.parents]:
        try:
            st = os.lstat(p)
        except OSError as exc:
            return f"{p}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{p} is a symlink"
        if st.st_uid != 0:
            return f"{p} is not owned by root (uid {st.st_uid})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{p} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def private_dir(env: Mapping[str, str], kind: str) -> Path:
    """The node's directory for runs' ``kind`` files: ``$XDG_STATE_HOME/asm/<kind>``, else
    ``$HOME/.local/state/asm/<kind>`` (the node's state, never the run's workspace)."""
    base = env.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "state")
    return Path(base, "asm", kind)


def gemini_settings_dir(env: Mapping[str, str]) -> Path:
    """The node's directory for runs' Gemini settings files (``private_dir(env, "gemini-mcp")``)."""
    return private_dir(env, "gemini-mcp")


def write_private(directory: Path, run_id: str, text: str) -> str:
    """Write ``text`` to ``<directory>/<run id>.json``, mode 0600, every level it creates 0700; its path.

    ConfigError (``mcp_unsupported``) when it cannot be written. Files of runs that ended long ago
    (their node was killed before it could remove them) are pruned."""
    try:
        for level in [*reversed(directory.parents), directory]:
            if not level.exists():
                level.mkdir(mode=0o700)  # every level it creates private (Gemini checks them all)
        _prune(directory)
        path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id)[:200]}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write the run's MCP settings in {directory}: {exc.strerror}",
                          reason=MCP_UNSUPPORTED) from None
    return str(path)


def write_gemini_settings(servers: Mapping[str, McpServer], env: Mapping[str, str], run_id: str,
                          cwd: str) -> str:
    """Write the run's Gemini system settings file (the node's system settings plus its servers) and return
    its path, for ``GEMINI_CLI_SYSTEM_SETTINGS_PATH``; ConfigError when Gemini would not read it."""
    directory = gemini_settings_dir(env)
    if Path(cwd) == directory or Path(cwd) in directory.parents:
        raise ConfigError(f"the node's Gemini settings directory {directory} is inside the run's workspace {cwd}",
                          reason=MCP_UNSUPPORTED)
    base: dict[str, Any] = {}
    existing = env.get("GEMINI_CLI_SYSTEM_SETTINGS_PATH") or GEMINI_SYSTEM_SETTINGS
    try:
        with open(existing, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, dict):
            base = loaded  # the operator's system settings stay in force
    except (OSError, ValueError):
        pass
    mcp = dict(base.get("mcpServers") or {}) if isinstance(base.get("mcpServers"), dict) else {}
    mcp.update(gemini_entries(servers))
    settings = {**base, "mcpServers": mcp}
    path = Path(write_private(directory, run_id, json.dumps(settings)))
    why = secure_for_gemini(path)
    if why:
        os.unlink(path)
        raise ConfigError(
            "Gemini CLI takes MCP servers for a run only from a system settings file that root owns in "
            f"directories nobody else may write (its own check), and here {why}: run the node as root with "
            "XDG_STATE_HOME (or HOME) on such a path, or configure the servers in Gemini's own settings",
            reason=MCP_UNSUPPORTED)
    return str(path)


def _prune(directory: Path) -> None:
    """Remove settings files of runs that ended long ago (they may hold servers' env values)."""
    cutoff = time.time() - STALE_AFTER_S
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False) \
                    and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            continue


#: The option's type in a provider's options model: a checked mapping of names to servers.
McpServers = Annotated[dict[str, McpServer], PlainValidator(parse_servers)]
