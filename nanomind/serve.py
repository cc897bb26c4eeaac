"""`nanomind serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching and a web page.

nanomind serve --ckpt runs/sft                          # http://127.0.0.1:8000 (web chat at /)
nanomind serve --ckpt runs/sft --host 0.0.0.0 --api-key SECRET

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with "stream": true for SSE),
GET /health, GET / (the web chat page). Every request joins the running batch of one engine (engine.py).
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from nanomind.config import arg
from nanomind.engine import Engine, Request
from nanomind.generate import SamplingConfig
from nanomind.openai_protocol import ChatRequest, CompletionRequest, OutputParser, chat_messages, error_body
from nanomind.tokenizer import StreamDecoder, Tokenizer, render_chat

THINK_PREFILL = {None: "", True: "<think>\n", False: "<think>\n\n</think>\n\n"}


@dataclass(kw_only=True)
class ServeConfig(SamplingConfig):
    ckpt: str = arg(help="checkpoint directory (or a run directory: its newest checkpoint)")
    host: str = arg("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server)")
    port: int = arg(8000, "TCP port")
    api_key: str = arg("", "require `Authorization: Bearer KEY` on /v1/* (recommended beyond loopback)")
    model_name: str = arg("", "model id reported by /v1/models (default: the checkpoint's directory name)")
    max_batch: int = arg(32, "requests decoded together; more wait for a free slot")
    max_len: int = arg(0, "context per request in tokens (0 = the model's max_position_embeddings)")
    max_body_bytes: int = arg(1_000_000, "larger request bodies get 413")
    max_new_tokens: int = arg(512, "default max_tokens when a request gives none")
    device: str = arg("auto", "cpu, cuda, mps or auto")
    dtype: str = arg("fp32", "weights precision", choices=["fp32", "bf16"])


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


class Server:
    """The model, tokenizer and engine behind the app; turns requests into engine work and replies."""

    def __init__(self, model, tok: Tokenizer, cfg: ServeConfig):
        self.tok, self.cfg = tok, cfg
        self.engine = Engine(model, cfg.max_batch, cfg.max_len or None)
        self.model_id = cfg.model_name or Path(cfg.ckpt).resolve().name

    def sampling(self, r, room: int) -> SamplingConfig:
        c = self.cfg
        max_tokens = getattr(r, "max_completion_tokens", None) or r.max_tokens or c.max_new_tokens
        return SamplingConfig(
            max_new_tokens=min(max_tokens, room),
            temperature=c.temperature if r.temperature is None else r.temperature,
            top_k=c.top_k if r.top_k is None else r.top_k,
            top_p=c.top_p if r.top_p is None else r.top_p,
            repetition_penalty=c.repetition_penalty if r.repetition_penalty is None else r.repetition_penalty,
            frequency_penalty=r.frequency_penalty,
            presence_penalty=r.presence_penalty,
            seed=uuid.uuid4().int % 2**63 if r.seed is None else r.seed,
            ignore_eos=r.ignore_eos,
        )

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tok.encode_prompt(text)  # a trailing "\n\n" split as training saw it (tokenizer.py)
        if len(ids) >= self.engine.max_len:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model reads {self.engine.max_len - 1} at "
                           "most before its reply", param="messages", code="context_length_exceeded")  # fmt: skip
        return ids

    async def run(self, r, prompt: list[int], parser: OutputParser, on_piece, is_disconnected) -> dict:
        """Submit one request and feed its text pieces to `on_piece(kind, text)` (awaited) as they come;
        returns the finish reason and usage. A client that goes away cancels the request (its slot is freed)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        stop_ids = (self.tok.eos_id, self.tok.im_end_id)
        req = Request(prompt, self.sampling(r, self.engine.max_len - len(prompt)),
                      lambda t, f: loop.call_soon_threadsafe(events.put_nowait, (t, f)), stop_ids)  # fmt: skip
        decoder, generated, finish = StreamDecoder(self.tok), 0, "length"
        self.engine.submit(req)
        try:
            while True:
                try:
                    token, end = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await is_disconnected():
                        req.cancel()
                        return {"finish": "cancelled"}
                    continue
                if end is not None:
                    finish = "stop" if end == "stop" else "length"
                    generated += end == "stop"  # the stop token was generated too
                    for piece in parser.feed(decoder.flush(), final=True):
                        await on_piece(*piece)
                    break
                generated += 1
                for piece in parser.feed(decoder.push(token)):
                    await on_piece(*piece)
                if parser.stopped:
                    req.cancel()
                    finish = "stop"
                    break
        finally:
            req.cancel()  # no-op when finished; frees the slot when the client went away mid-stream
        if parser.tool_calls:
            finish = "tool_calls"
        usage = {"prompt_tokens": len(prompt), "completion_tokens": generated,
                 "total_tokens": len(prompt) + generated}  # fmt: skip
        return {"finish": finish, "usage": usage}


def build_app(server: Server):
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    app = FastAPI(title="nanomind", docs_url=None, redoc_url=None)
    cfg = server.cfg

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[:3])), status_code=422)

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        wrong_key = request.headers.get("authorization", "") != f"Bearer {cfg.api_key}"
        if request.url.path.startswith("/v1/") and cfg.api_key and wrong_key:
            message = "missing or wrong API key (Authorization: Bearer KEY)"
            return JSONResponse(error_body(message, "authentication_error", code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_body_bytes:
            return JSONResponse(error_body(f"request body over {cfg.max_body_bytes} bytes"), status_code=413)
        return await call_next(request)

    async def parse(request: HttpRequest, schema):
        body = await request.body()
        if len(body) > cfg.max_body_bytes:
            raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            raise ApiError(422, f"{param}: {first['msg']}", param=param) from None

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "running": len(e.running), "waiting": e.waiting.qsize(), "model": server.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "nanomind"}]}  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("nanomind") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        r: ChatRequest = await parse(request, ChatRequest)
        try:
            messages = chat_messages(r.messages, r.tools)
        except ValueError as e:
            raise ApiError(422, str(e), param="messages") from None
        text, _ = render_chat(messages, add_generation_prompt=True)
        thinking = r.thinking()
        prompt = server.prompt_ids(text + THINK_PREFILL[thinking])
        parser = OutputParser(r.stop, thinking=bool(thinking), tools=bool(r.tools))
        return await respond(request, r, prompt, parser, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        r: CompletionRequest = await parse(request, CompletionRequest)
        prompt = server.prompt_ids(r.prompt)
        return await respond(request, r, prompt, OutputParser(r.stop), chat=False)

    async def respond(request, r, prompt, parser, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
        base = {"id": rid, "created": created, "model": server.model_id}
        if not r.stream:
            parts: dict[str, str] = {"content": "", "reasoning": ""}

            async def collect(kind_, text):
                if kind_ != "tool":
                    parts[kind_] += text

            result = await server.run(r, prompt, parser, collect, request.is_disconnected)
            if result["finish"] == "cancelled":
                return JSONResponse(error_body("client closed the request"), status_code=499)
            if chat:
                message = {"role": "assistant", "content": parts["content"]}
                if parts["reasoning"]:
                    message["reasoning_content"] = parts["reasoning"]
                if parser.tool_calls:
                    message["tool_calls"] = parser.tool_calls
                    message["content"] = parts["content"] or None
                choice = {"index": 0, "message": message, "finish_reason": result["finish"]}
            else:
                choice = {"index": 0, "text": parts["content"], "finish_reason": result["finish"], "logprobs": None}
            return {**base, "object": kind, "choices": [choice], "usage": result["usage"]}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((r.stream_options or {}).get("include_usage"))

        def sse(payload) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta: dict | None = None, text: str = "", finish=None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return sse({**base, "object": chunk_kind, "choices": [choice]})

        async def stream():
            out: asyncio.Queue = asyncio.Queue()

            async def push(kind_, text):
                if not chat:
                    await out.put(chunk(text=text))
                elif kind_ == "tool":
                    call = parser.tool_calls[int(text)]
                    await out.put(chunk({"tool_calls": [{"index": int(text), **call}]}))
                else:
                    await out.put(chunk({"reasoning_content" if kind_ == "reasoning" else "content": text}))

            task = asyncio.create_task(server.run(r, prompt, parser, push, request.is_disconnected))
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                while not (task.done() and out.empty()):
                    try:
                        yield await asyncio.wait_for(out.get(), timeout=0.5)
                    except TimeoutError:
                        continue
                result = task.result()
                if result["finish"] == "cancelled":
                    return
                yield chunk(finish=result["finish"])
                if include_usage:
                    yield sse({**base, "object": chunk_kind, "choices": [], "usage": result["usage"]})
                yield "data: [DONE]\n\n"
            finally:
                task.cancel()  # the client went away: run() cancels the engine request on its way out

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    from nanomind import checkpoint
    from nanomind.config import parse
    from nanomind.device import resolve_device

    cfg = parse(ServeConfig, argv, "nanomind serve", __doc__.splitlines()[0])
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serving needs fastapi and uvicorn: pip install 'nanomind[serve]'") from None
    import torch

    tok = Tokenizer.load(checkpoint.tokenizer_dir(cfg.ckpt))
    model = checkpoint.load_model(cfg.ckpt, resolve_device(cfg.device)).eval()
    if cfg.dtype == "bf16":
        model.to(torch.bfloat16)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach it can use it")
    server = Server(model, tok, cfg)
    # The engine gets its own thread and uvicorn the main one. The other way round made a lone request's steps
    # 2x faster on 2 CPU cores but starved the HTTP thread (OpenMP workers spin between kernels): 10 tokens/s.
    server.engine.start()
    print(f"nanomind serve: {server.model_id} on http://{cfg.host}:{cfg.port} (web chat at /), "
          f"{cfg.max_batch} requests at a time")  # fmt: skip
    try:
        uvicorn.run(build_app(server), host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        server.engine.stop()
