"""HOST:PORT parsing shared by the CLI, the node server and the controller."""

from __future__ import annotations

from asm_wire._errors import ConfigError


def parse_address(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6]:PORT``; raise ConfigError with a clear message."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid address {value!r}: expected HOST:PORT (e.g. 127.0.0.1:7070)")
    return host, int(port)


def grpc_target(value: str) -> str:
    host, port = parse_address(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    import ipaddress  # (here: a client that never asks imports it not at all)

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
