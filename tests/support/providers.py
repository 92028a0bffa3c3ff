"""Scripted providers shared by test modules, built on :class:`asm_node.testing.ScriptedProvider`."""

from __future__ import annotations

from asm_node.testing import ScriptedProvider

# The "CLI": prints an approval request, then waits for a line on stdin and echoes it.
APPROVAL_SCRIPT = (
    "import json, sys\n"
    "print(json.dumps({'approval': 'ap-1', 'tool': 'Bash'}), flush=True)\n"
    "line = sys.stdin.readline()\n"
    "print(json.dumps({'text': line.strip()}), flush=True)\n"
)


def approval_provider() -> ScriptedProvider:
    """``scripted``: asks for approval ``ap-1`` (tool Bash), then echoes one line of stdin as text."""
    return ScriptedProvider(script=APPROVAL_SCRIPT, stdin=True)
