"""A tiny stdio MCP server for the tests: JSON-RPC 2.0, one message per line on stdin/stdout.

It answers ``initialize``, ``tools/list`` and ``tools/call`` (plus ``ping`` and the empty lists a
client may ask for) and offers one tool, ``lookup``, whose result is :data:`SECRET` (or the value
of ``$MCP_SECRET``, so a test can check that the ``env`` of an ``mcp_servers`` entry arrived).
Notifications (no ``id``) are read and ignored. With ``--log FILE`` every request is appended to
FILE as a JSON line, so a test can tell the CLI really called the tool.

Run it as ``python tests/support/mcp_server.py [--log FILE]``; it exits at the end of stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

TOOL = "lookup"
SECRET = "mcp-secret-7731"
PROTOCOL = "2025-06-18"

_TOOLS = [{
    "name": TOOL,
    "description": "Look up the test secret for a key. Always call this tool when asked for the secret.",
    "inputSchema": {"type": "object", "properties": {"key": {"type": "string", "description": "what to look up"}},
                    "required": []},
}]


def answer(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The response to one JSON-RPC message (None for a notification)."""
    if "id" not in msg:
        return None
    rid, method = msg["id"], msg.get("method")
    params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
    result: dict[str, Any]
    if method == "initialize":
        version = params.get("protocolVersion") if isinstance(params.get("protocolVersion"), str) else PROTOCOL
        result = {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                  "serverInfo": {"name": "asm-test-mcp", "version": "1.0.0"}}
    elif method == "tools/list":
        result = {"tools": _TOOLS}
    elif method == "tools/call":
        if params.get("name") != TOOL:
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": f"unknown tool {params.get('name')!r}"}}
        secret = os.environ.get("MCP_SECRET") or SECRET
        result = {"content": [{"type": "text", "text": secret}], "isError": False}
    elif method == "ping":
        result = {}
    elif method in ("resources/list", "prompts/list", "resources/templates/list"):
        key = {"resources/list": "resources", "prompts/list": "prompts"}.get(method, "resourceTemplates")
        result = {key: []}
    else:
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"method not found: {method}"}}
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log", metavar="FILE", help="append every request to FILE (JSON lines)")
    args = parser.parse_args(argv)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            reply: dict[str, Any] | None = {"jsonrpc": "2.0", "id": None,
                                            "error": {"code": -32700, "message": "parse error"}}
        else:
            if args.log and isinstance(msg, dict):
                with open(args.log, "a") as f:
                    f.write(json.dumps(msg) + "\n")
            reply = answer(msg) if isinstance(msg, dict) else None
        if reply is not None:
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
