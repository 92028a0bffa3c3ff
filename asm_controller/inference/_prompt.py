"""What a chat-completions request may ask for, and the prompt a CLI gets from it.

The prompt is ASM's: a non-blank ``prompt`` string wins; otherwise every message becomes
``"<role>: <content>"`` (the role lowercased, ``user`` when absent; a system message is one such line,
``system: ...``, like any other), blank contents are skipped, and the lines are joined by ``"\\n"``.
Bounded as ASM's later PromptNormalizer bounds it: at most 128 messages, at most 262144 bytes of
prompt, roles system/developer/user/assistant/tool.

Where asm differs from ASM 0.9.2, on purpose:

* Content given as parts: the ``text`` parts are joined (ASM pasted the list's Elixir ``inspect``);
  an image, audio or file part is refused (a CLI prompt is text), not pasted.
* A ``null`` content (an assistant turn that only called tools) is skipped, not sent as ``nil``.
* ``functions`` / ``function_call`` (the legacy tool fields) are refused like ``tools`` /
  ``tool_choice``; ASM let them through and ignored them.
* ``n`` other than 1, ``logprobs: true`` and a ``response_format`` other than text are refused:
  asm returns one plain-text choice, and saying so beats answering something else.
* The ``shell`` provider (not in ASM) runs its prompt as one command line: it takes the text of a
  single user message (or ``prompt``) as is, since ``user: echo hi`` is no command.
"""

from __future__ import annotations

from typing import Any, Final

from asm_controller.inference._errors import bad_request
from asm_controller.inference._openai import ChatCompletionRequest, ChatMessage

MAX_MESSAGES: Final = 128
MAX_PROMPT_BYTES: Final = 262_144
ROLES: Final = ("system", "developer", "user", "assistant", "tool")
#: ASM's message for every tool-bearing request.
TOOLS_REFUSED: Final = "tool-bearing requests are not supported on cli completion endpoints"
NO_INPUT: Final = "Unsupported input shape. Expected non-empty prompt string or map with `prompt`/`messages`."
#: Providers whose prompt is a command line, not a transcript.
BARE_PROMPT_PROVIDERS: Final = frozenset({"shell"})


def _names_a_choice(value: Any) -> bool:
    return value is not None and value != "none"


def uses_tools(req: ChatCompletionRequest) -> str | None:
    """The field that makes this a tool-bearing request (ASM's test, plus the legacy function fields)."""
    if req.tools:
        return "tools"
    if _names_a_choice(req.tool_choice):
        return "tool_choice"
    if req.functions:
        return "functions"
    if _names_a_choice(req.function_call):
        return "function_call"
    return None


def check_request(req: ChatCompletionRequest) -> None:
    """ASM's tools refusal, then what asm cannot honour (each a 400 naming its ``param``)."""
    field = uses_tools(req)
    if field is not None:
        raise bad_request(TOOLS_REFUSED, param=field)
    if req.n is not None and req.n != 1:
        raise bad_request(f"only n=1 is supported (a CLI run gives one answer), got n={req.n}", param="n")
    if req.logprobs:
        raise bad_request("logprobs are not available from CLI providers", param="logprobs")
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise bad_request(f"response_format {fmt.get('type')!r} is not supported (only \"text\")",
                          param="response_format")


def _content(msg: ChatMessage, index: int) -> str:
    c = msg.content
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    texts = []
    for j, part in enumerate(c):
        if part.type != "text":
            raise bad_request(f"content part of type {part.type!r} is not supported (only text parts)",
                              param=f"messages[{index}].content[{j}]")
        texts.append(part.text or "")
    return "\n".join(texts)


def build_prompt(req: ChatCompletionRequest, provider: str = "") -> str:
    """The prompt ASM builds from ``prompt`` or ``messages`` (see the module docstring), bounded."""
    if req.prompt is not None and req.prompt.strip():
        prompt = req.prompt
    else:
        messages = req.messages or []
        if len(messages) > MAX_MESSAGES:
            raise bad_request(f"too many messages: {len(messages)} (at most {MAX_MESSAGES})", param="messages")
        lines: list[tuple[str, str]] = []
        for i, msg in enumerate(messages):
            role = (msg.role or "user").lower()
            if role not in ROLES:
                raise bad_request(f"unsupported role {msg.role!r} (expected one of {', '.join(ROLES)})",
                                  param=f"messages[{i}].role")
            content = _content(msg, i)
            if content.strip():
                lines.append((role, content))
        if not lines:
            raise bad_request(NO_INPUT, param="messages")
        if provider in BARE_PROMPT_PROVIDERS:
            if len(lines) != 1 or lines[0][0] != "user":
                raise bad_request(f"the {provider} provider runs one command line: send one user message",
                                  param="messages")
            prompt = lines[0][1]
        else:
            prompt = "\n".join(f"{role}: {content}" for role, content in lines)
    size = len(prompt.encode())
    if size > MAX_PROMPT_BYTES:
        raise bad_request(f"prompt is {size} bytes (at most {MAX_PROMPT_BYTES})", param="messages")
    return prompt
