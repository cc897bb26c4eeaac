"""The OpenAI chat / completions protocol at the edge of the server: request schemas, messages -> our chat
messages (tools rendered into the system turn), and the parser that turns streamed text into content,
reasoning_content and tool_calls while honouring stop strings."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IM_THINK, IM_THINK_END = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class Sampling(BaseModel):
    """Fields shared by both endpoints. Unset fields take the CLI's defaults (see `nanomind serve --help`)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (vLLM-style)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # extension (vLLM-style)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # extension, for benchmarks

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts are understood
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError(f"content part of type {p.get('type')!r}: only text parts are supported")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    enable_thinking: bool | None = None  # extension; also read from chat_template_kwargs
    chat_template_kwargs: dict[str, Any] | None = None

    def thinking(self) -> bool | None:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return (self.chat_template_kwargs or {}).get("enable_thinking")


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt: give one string (batched prompts are not supported)")
            v = v[0]
        if not v:
            raise ValueError("prompt: must not be empty")
        return v


def tools_prompt(tools: list[dict]) -> str:
    """The tool signatures as the system turn presents them, and how the model is to call them."""
    lines = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    example = '{"name": "function-name", "arguments": {"arg": "value"}}'
    return (
        "# Tools\n\nYou can call these functions; their signatures are inside <tools></tools>:\n"
        f"<tools>\n{lines}\n</tools>\n\nTo call one, answer with a JSON object of its name and arguments "
        f"inside tags:\n{TOOL_OPEN}\n{example}\n{TOOL_CLOSE}"
    )


def chat_messages(messages: list[Message], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages -> the messages our chat template renders (Qwen's conventions for tools: calls inside
    <tool_call> tags in the assistant turn, results inside <tool_response> tags in a user turn)."""
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if role == "assistant" and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                f = c.get("function", {})
                args = f.get("arguments", "{}")
                args = json.loads(args) if isinstance(args, str) and args.strip().startswith("{") else args
                calls.append(f"{TOOL_OPEN}\n{json.dumps({'name': f.get('name'), 'arguments': args})}\n{TOOL_CLOSE}")
            text = "\n".join([text, *calls] if text else calls)
        if role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("_tool"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "_tool": True})
            continue
        msg = {"role": role, "content": text}
        if role == "assistant" and m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    if tools:
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + tools_prompt(tools)
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


class OutputParser:
    """Streamed model text -> (kind, text) pieces, kind "content" or "reasoning", plus completed tool calls.

    Stop strings end the output before them; <think>...</think> goes to reasoning (newlines around it trimmed);
    with tools, <tool_call>{json}</tool_call> blocks become tool calls. Text that might be the start of a stop
    string or tag is held back until the next piece decides it."""

    def __init__(self, stops: list[str] | None, thinking: bool = False, tools: bool = False):
        self.stops = list(stops or [])
        self.mode = "reasoning" if thinking else "content"
        self.tags = [IM_THINK, IM_THINK_END] + ([TOOL_OPEN, TOOL_CLOSE] if tools else [])
        self.pending = ""
        self.stopped = False
        self.section_start = True  # drop newlines at the start of a section
        self.tool_calls: list[dict] = []
        self._tool_text = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self.pending += text
        while self.pending and not self.stopped:
            markers = [(self.pending.find(m), m) for m in self.stops + self.tags]
            found = [(i, m) for i, m in markers if i >= 0]
            if not found:
                keep = 0 if final else self._held_back()
                self._emit(self.pending[: len(self.pending) - keep], out)
                self.pending = self.pending[len(self.pending) - keep :]
                break
            i, marker = min(found, key=lambda x: (x[0], -len(x[1])))
            self._emit(self.pending[:i], out, closing=marker in (IM_THINK_END, TOOL_OPEN))
            self.pending = self.pending[i + len(marker) :]
            if marker in self.stops:
                self.stopped = True
            elif marker == IM_THINK:
                self.mode, self.section_start = "reasoning", True
            elif marker == IM_THINK_END:
                self.mode, self.section_start = "content", True
            elif marker == TOOL_OPEN:
                self.mode, self._tool_text = "tool", ""
            elif marker == TOOL_CLOSE and self.mode == "tool":
                self._close_tool(out)
        if final and self.mode == "tool":  # an unterminated call: give it back as text
            self.mode = "content"
            self._emit(TOOL_OPEN + self._tool_text, out)
        return out

    def _held_back(self) -> int:
        """Length of the longest end of `pending` that begins a stop string or tag (or trailing newlines in
        reasoning, which are trimmed if </think> follows)."""
        p, keep = self.pending, 0
        for m in self.stops + self.tags:
            for n in range(min(len(m) - 1, len(p)), 0, -1):
                if p.endswith(m[:n]):
                    keep = max(keep, n)
                    break
        if self.mode == "reasoning":  # and the newlines just before that
            rest = p[: len(p) - keep]
            keep += len(rest) - len(rest.rstrip("\n"))
        return keep

    def _emit(self, text: str, out: list, closing: bool = False) -> None:
        if self.mode == "tool":
            self._tool_text += text
            return
        if self.section_start:
            text = text.lstrip("\n")
            self.section_start = not text
        if closing and self.mode == "reasoning":
            text = text.rstrip("\n")
        if text:
            out.append((self.mode, text))

    def _close_tool(self, out: list) -> None:
        self.mode, self.section_start = "content", True
        try:
            call = json.loads(self._tool_text)
            name, args = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # not a call after all: keep the text
            out.append(("content", TOOL_OPEN + self._tool_text + TOOL_CLOSE))
            return
        function = {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}
        self.tool_calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function})
        out.append(("tool", str(len(self.tool_calls) - 1)))


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
