"""A fake Claude Code for tests that need no real CLI: ``--print --output-format stream-json``.

It behaves as Claude Code 2.1 was measured to (tests/test_steering.py): with ``--input-format
stream-json`` it reads user messages from stdin until EOF, echoes each with ``isReplay`` when it
takes it (``--replay-user-messages``), answers each in a turn of its own (a message that arrives
while it answers waits for the next turn) and prints a ``result`` per turn with the process's
cumulative ``total_cost_usd``; without it, it answers the prompt on argv once. A prompt containing
``SLOW`` streams six deltas 0.25 s apart first. ``--resume=ID`` makes ID the session id.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The script (run with this Python).
FAKE_CLAUDE = r'''
import json, queue, sys, threading, time
args = sys.argv[1:]
def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
SID = next((a.split("=", 1)[1] for a in args if a.startswith("--resume=")), "11111111-2222-4333-8444-555555555555")
out({"type": "system", "subtype": "init", "session_id": SID, "cwd": ".", "tools": [], "model": "fake"})
inbox = queue.Queue()
if "--input-format" in args:
    def read():
        for line in sys.stdin:
            if line.strip():
                inbox.put(json.loads(line))
        inbox.put(None)
    threading.Thread(target=read, daemon=True).start()
else:
    inbox.put({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": args[-1]}]}})
    inbox.put(None)
turns = 0
while True:
    msg = inbox.get()
    if msg is None:
        break
    text = "".join(b.get("text", "") for b in msg["message"]["content"])
    if "--replay-user-messages" in args:
        out({**msg, "session_id": SID, "isReplay": True})
    turns += 1
    mid = f"msg_{turns}"
    answer = f"answer {turns}: {text}"
    if "SLOW" in text:
        for i in range(6):
            time.sleep(0.25)
            out({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": f"s{i} "}}})
    out({"type": "assistant", "message": {"id": mid, "model": "fake", "content": [{"type": "text", "text": answer}],
         "usage": {"input_tokens": 100, "output_tokens": 20}}})
    out({"type": "result", "subtype": "success", "is_error": False, "result": answer, "session_id": SID,
         "usage": {"input_tokens": 100, "output_tokens": 20}, "total_cost_usd": 0.001 * turns, "num_turns": 1})
    if "--input-format" not in args:
        break
'''




def install_fake_claude(directory: Path) -> Path:
    """Write the fake as an executable ``claude`` in ``directory``; its path (for CLAUDE_CLI_PATH)."""
    script = directory / "claude"
    script.write_text(f"#!{sys.executable}\n{FAKE_CLAUDE}")
    script.chmod(0o755)
    return script
