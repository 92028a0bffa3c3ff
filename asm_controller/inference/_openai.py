"""The OpenAI chat-completions subset asm serves, as pydantic models (shapes of openai-python's types).

Requests are lenient where ASM was (unknown fields are ignored, sampling knobs are accepted and have no
effect: a CLI picks its own), and refuse what asm cannot honour instead of silently ignoring it
(:func:`asm_controller.inference._prompt.check_request`). Responses are exactly what ``openai`` parses.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts can reach a CLI."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = "user"  # ASM's default when a message names none
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``prompt`` is ASM's extension (it wins over ``messages``)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    #: ASM accepted the string "true" too.
    stream: bool | Literal["true", "false"] | None = None
    stream_options: StreamOptions | None = None
    # Accepted and without effect (ASM's behaviour): a CLI chooses its own sampling and limits.
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # Refused unless harmless (see check_request): asm returns one text choice and runs no client tools.
    n: int | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @property
    def streaming(self) -> bool:
        return self.stream is True or self.stream == "true"


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        """One SSE frame (``data: {...}`` and a blank line)."""
        body = self.model_dump(exclude_none=True)
        for choice, model in zip(body["choices"], self.choices, strict=True):
            choice["finish_reason"] = model.finish_reason  # null until the last chunk, as OpenAI sends it
        return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


#: The frame that ends every stream.
SSE_DONE = "data: [DONE]\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "asm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """The error shape OpenAI clients parse: ``{"error": {"message", "type", "code", "param"}}``."""

    error: ErrorDetail
