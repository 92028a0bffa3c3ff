"""Hermetic environments for running the real agent CLIs against tests/support/fake_model_server.py.

Each ``*_env(base_url, scratch)`` creates the CLI's own HOME/TMPDIR (and config files) under
``scratch`` and returns the environment variables to ADD to the process environment. Use
:func:`hermetic_env` to merge them into a copy of ``os.environ`` with every variable that could
leak a real account, endpoint or proxy removed. See shared/spec/real_clis.md.

The CLIs themselves are installed by ``scripts/install_clis.sh`` into
``${ASM_CLI_CACHE:-~/.cache/asm-clis}``; :func:`find_cli` looks there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

CLI_NAMES = ("claude", "codex", "gemini")
CODEX_MODEL = "gpt-5.5"
GEMINI_MODEL = "gemini-2.5-flash"

# Variables removed from the inherited environment: real credentials/endpoints and nesting markers.
_STRIP_PREFIXES = ("ANTHROPIC_", "CLAUDE", "OPENAI_", "CODEX_", "GEMINI_", "GOOGLE_", "VERTEX", "AMP_",
                   "OTEL_", "XDG_")
_STRIP_NAMES = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "no_proxy", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "DISABLE_TELEMETRY", "IS_SANDBOX", "TMPDIR", "NODE_OPTIONS", "DEBUG"}


def cli_cache() -> Path:
    return Path(os.environ.get("ASM_CLI_CACHE") or Path.home() / ".cache" / "asm-clis")


def find_cli(name: str) -> Path | None:
    """The installed CLI's bin path in the cache, or None when it is not installed."""
    path = cli_cache() / "node_modules" / ".bin" / name
    return path if path.exists() and os.access(path, os.X_OK) else None


def _dirs(scratch: Path, name: str) -> tuple[Path, Path]:
    home = scratch / "home" / name
    tmp = scratch / "tmp" / name
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    return home, tmp


def _common(home: Path, tmp: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "NO_COLOR": "1",
    }


def claude_env(base_url: str, scratch: Path) -> dict[str, str]:
    """Claude Code 2.1.x: calls ``$ANTHROPIC_BASE_URL/v1/messages?beta=true``."""
    home, tmp = _dirs(scratch, "claude")
    return {
        **_common(home, tmp),
        "ANTHROPIC_BASE_URL": base_url.rstrip("/"),  # no /v1 suffix
        "ANTHROPIC_API_KEY": "sk-ant-dummy-key",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "IS_SANDBOX": "1",  # needed for --dangerously-skip-permissions as root
        "CLAUDE_CODE_TMPDIR": str(tmp),
        "CLAUDE_CODE_MAX_RETRIES": "1",
    }


def codex_config_toml(base_url: str) -> str:
    return f"""\
model = "{CODEX_MODEL}"
model_provider = "local"

[model_providers.local]
name = "Local fake"
base_url = "{base_url.rstrip('/')}/v1"
env_key = "LOCAL_API_KEY"
wire_api = "responses"
request_max_retries = 1
stream_max_retries = 1

[features]
plugins = false
apps = false

[analytics]
enabled = false
"""


def codex_env(base_url: str, scratch: Path) -> dict[str, str]:
    """Codex 0.169: calls ``<base_url>/v1/responses`` via a ``local`` provider in ``$CODEX_HOME/config.toml``."""
    home, tmp = _dirs(scratch, "codex")
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config_toml(base_url))
    return {
        **_common(home, tmp),
        "CODEX_HOME": str(codex_home),
        "LOCAL_API_KEY": "sk-dummy",
    }


def gemini_settings() -> dict[str, object]:
    return {
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False},
        "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False, "maxAttempts": 1},
    }


def gemini_env(base_url: str, scratch: Path) -> dict[str, str]:
    """Gemini CLI 0.61: calls ``$GOOGLE_GEMINI_BASE_URL/v1beta/models/<model>:streamGenerateContent``."""
    home, tmp = _dirs(scratch, "gemini")
    gemini_dir = home / ".gemini"
    gemini_dir.mkdir(parents=True, exist_ok=True)
    (gemini_dir / "settings.json").write_text(json.dumps(gemini_settings(), indent=2) + "\n")
    return {
        **_common(home, tmp),
        "GOOGLE_GEMINI_BASE_URL": base_url.rstrip("/"),
        "GEMINI_API_KEY": "dummy-gemini-key",
        "GEMINI_CLI_TRUST_WORKSPACE": "true",
        "GEMINI_CLI_NO_RELAUNCH": "true",
    }


ENV_BUILDERS = {"claude": claude_env, "codex": codex_env, "gemini": gemini_env}


def cli_env(name: str, base_url: str, scratch: Path) -> dict[str, str]:
    return ENV_BUILDERS[name](base_url, scratch)


def hermetic_env(additions: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) minus credentials/proxies/nesting markers, plus ``additions``."""
    src = os.environ if base is None else base
    env = {k: v for k, v in src.items() if k not in _STRIP_NAMES and not k.startswith(_STRIP_PREFIXES)}
    env.update(additions)
    return env
