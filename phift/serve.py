"""`phift api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model of either family (phi, Phi-3),
with continuous batching.

    Engine       the batching loop, in a thread of its own: a pool of KV-cache rows ("slots"); a request's rows
                 join the pool between two decode steps and leave it the step they finish (or their client goes)
    create_app   the HTTP side: /v1/models, /v1/chat/completions, /v1/completions (streamed as server-sent events
                 or not), every error in OpenAI's shape {"error": {"message", "type", "param", "code"}}

How the pool shares one cache. All rows write the same cache column each decode step, so a step is one batched
forward of one token per row. A row's tokens fill the columns [start, length) and its mask is 1 there and 0 to the
left; positions are counted over the mask (`Phi.forward`), so a row that joined late sees itself at positions
0, 1, ... A new row's prompt is prefilled on its own (batched with the others that join at the same step) and its
keys and values copied into the columns just left of `length`; when the prompt is longer than `length`, every row
moves right first. When the cache is full, rows move left by the free columns they all have on their left: every
request fits the context (prompt + max_tokens), so a row that began in column 0 has finished by then. A row's tokens
stay in adjacent columns, so a sliding window (Phi-3-mini-4k), which the model counts in columns, spans the same
tokens as in a batch of its own.

A row ends at any of its request's stop token ids (the chat template's end token, Phi-3's <|end|>, beside eos:
data.stop_token_ids) or at a stop word in its text.

LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) rotates every position of a forward with its long factors once
the forward's longest sequence outgrows the original length, and keys cached before that are stale
(phift.generate restarts its cache there). Every decode step here is one forward over all rows, so one long row
would switch its neighbours too: a LongRoPE model is served up to its original length (4096 tokens), prompt and
max_tokens together, and a request for more is refused (HTTP 400, context_length_exceeded) rather than answered
with other numbers than `phift chat` gives.
"""
from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .chat import TextStream
from .data import Template, encode_prompt, stop_token_ids
from .generate import sample_next
from .model import KVCache

# --------------------------------------------------------------------------------------------------- the engine


class QueueFull(Exception):
    """More rows wait for a slot than the server accepts (HTTP 429)."""


@dataclass(eq=False)
class Request:
    """One API call: `n` rows generated from the same prompt. Events go to `events` on the caller's event loop as
    (choice index, new text, finish reason or None); finish reason "error" carries the message as its text."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()  # tokens that end a row, unseen; none given: the tokenizer's eos
    n: int = 1
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # set by the HTTP side when the client has gone: its rows leave the pool
    completion_tokens: int = 0


@dataclass(eq=False)
class Row:
    request: Request
    index: int  # the choice index within its request
    stream: TextStream
    generated: int = 0
    slot: int = -1


class Engine:
    """Continuous batching over a pool of `max_batch_size` KV-cache rows; `max_queue` rows may wait for one."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 256, prefill_tokens: int = 8192):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config, self.device, self.dtype = model.config, model.wte.weight.device, model.wte.weight.dtype
        # the longest row served: the context, or LongRoPE's original length (see the module's docstring)
        context = model.config.max_position_embeddings
        self.rope_switch = getattr(model.config, "rope_switch_length", None)
        self.context = min(context, self.rope_switch or context)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_tokens = prefill_tokens  # prompts prefilled together hold at most this many (padded) tokens
        self.slots: list[Row | None] = [None] * max_batch_size
        self.cache = KVCache(self.config, max_batch_size, min(256, self.context), self.device, self.dtype)
        self.mask = torch.zeros(max_batch_size, self.cache.k.shape[3], dtype=torch.long, device=self.device)
        self.start = [0] * max_batch_size  # each slot's first column
        self.last = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # each slot's newest token
        self.waiting: collections.deque[Row] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.max_rows_seen = 0  # the most rows one decode step has run (a test asks whether batching happened)
        self.thread: threading.Thread | None = None

    # -- the caller's side (any thread)
    def submit(self, request: Request) -> None:
        rows = [Row(request, i, TextStream(self.tokenizer, request.stop)) for i in range(request.n)]
        with self.lock:
            if len(self.waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} completions are waiting for one of the {self.max_batch_size} "
                                "slots; try again later")
            self.waiting.extend(rows)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        """Its rows leave the queue now and the pool at the next step (a finished request is unaffected)."""
        request.cancelled = True
        with self.lock:
            self.waiting = collections.deque(r for r in self.waiting if r.request is not request)
            self.lock.notify()

    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def queued(self) -> int:
        return len(self.waiting)

    def start_thread(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="phift-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    # -- the engine's thread
    def _run(self) -> None:
        with torch.inference_mode():  # grad mode is per thread
            while True:
                with self.lock:
                    while not self.stopping and not self.waiting and not self.active():
                        self.lock.wait()
                    if self.stopping:
                        return
                    free = [i for i, r in enumerate(self.slots) if r is None]
                    joining, longest = [], 0
                    while self.waiting and len(joining) < len(free):
                        longest = max(longest, len(self.waiting[0].request.prompt))
                        if joining and (len(joining) + 1) * longest > self.prefill_tokens:
                            break  # the others join at the next step: a long prefill stalls every row's decoding
                        joining.append(self.waiting.popleft())
                for i, row in enumerate(self.slots):
                    if row is not None and row.request.cancelled:
                        self._leave(i)
                try:
                    if joining:
                        self._join(joining, free)
                    if self.active():
                        self._decode()
                except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                    for i, row in enumerate(self.slots):
                        if row is not None:
                            self._emit(row, f"{type(e).__name__}: {e}", "error")
                            self._leave(i)
                    for row in joining:
                        if row.slot < 0:
                            self._emit(row, f"{type(e).__name__}: {e}", "error")

    def _join(self, rows: list[Row], free: list[int]) -> None:
        """Prefill the new rows' prompts together, then copy their keys and values into free slots."""
        longest = max(len(r.request.prompt) for r in rows)
        if not self.active():
            self.cache.length = 0
        if self.cache.length < longest:  # room on the left for the longest prompt: every row moves right
            self._shift(longest - self.cache.length)
        ids = torch.full((len(rows), longest), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, longest - len(r.request.prompt):] = torch.tensor(r.request.prompt, device=self.device)
            mask[i, longest - len(r.request.prompt):] = 1
        prefill = KVCache(self.config, len(rows), longest, self.device, self.dtype)
        logits = self.model(ids, attention_mask=None if bool(mask.all()) else mask, kv_cache=prefill)[:, -1]
        end = self.cache.length
        for i, (r, slot) in enumerate(zip(rows, free)):
            p = len(r.request.prompt)
            self.cache.k[:, slot, :, end - p:end] = prefill.k[:, i, :, longest - p:]
            self.cache.v[:, slot, :, end - p:end] = prefill.v[:, i, :, longest - p:]
            self.mask[slot] = 0
            self.mask[slot, end - p:end] = 1
            self.start[slot], self.slots[slot], r.slot = end - p, r, slot
        self._advance(rows, logits, torch.tensor(free[:len(rows)], device=self.device))

    def _decode(self) -> None:
        """One token for every row in the pool: one forward over the slots up to the last one in use."""
        if self.cache.length == self.cache.k.shape[3]:
            self._grow_or_compact()
        n = max(i for i, r in enumerate(self.slots) if r is not None) + 1
        end = self.cache.length
        in_use = [r is not None for r in self.slots[:n]]
        self.mask[:n, end] = torch.tensor(in_use, device=self.device)
        logits = self.model(self.last[:n, None], attention_mask=self.mask[:n, :end + 1], kv_cache=self.cache)[:, -1]
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, sum(in_use))
        self._advance(self.slots[:n], logits, slice(0, n))

    def _advance(self, rows: list[Row | None], logits: torch.Tensor, slots) -> None:
        """Sample each row's next token (the next step's input in `slots`), hand its new text out, and let finished
        rows leave."""
        tokens = logits.argmax(dim=-1)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, r in enumerate(rows):
            if r is not None and r.request.temperature > 0:
                groups.setdefault((r.request.temperature, r.request.top_p), []).append(i)
        for (temperature, top_p), idx in groups.items():
            idx_t = torch.tensor(idx, device=self.device)
            tokens[idx_t] = sample_next(logits[idx_t], temperature, top_p)
        self.last[slots] = tokens
        for r, token in zip(rows, tokens.tolist()):
            if r is None:
                continue
            if token in (r.request.stop_ids or (self.tokenizer.eos_token_id,)):
                self._emit(r, r.stream.finish(), "stop")
                self._leave(r.slot)
                continue
            r.generated += 1
            r.request.completion_tokens += 1
            text = r.stream.push(token)
            if r.stream.stopped:
                self._emit(r, text, "stop")
            elif r.generated >= r.request.max_tokens:
                self._emit(r, text + r.stream.finish(), "length")
            else:
                if text:
                    self._emit(r, text, None)
                continue
            self._leave(r.slot)

    def _emit(self, row: Row, text: str, finish: str | None) -> None:
        request = row.request
        if request.events is None or request.cancelled:
            return
        try:
            request.loop.call_soon_threadsafe(request.events.put_nowait, (row.index, text, finish))
        except RuntimeError:  # the caller's event loop has closed: nobody is listening
            request.cancelled = True

    def _leave(self, slot: int) -> None:
        self.slots[slot] = None
        self.mask[slot] = 0

    def _shift(self, d: int) -> None:
        """Move every row's columns d to the right (d > 0) or -d to the left."""
        end = self.cache.length
        if end + d > self.cache.k.shape[3]:
            self._reserve(end + d)
        src, dst = (slice(0, end), slice(d, end + d)) if d > 0 else (slice(-d, end), slice(0, end + d))
        for t in (self.cache.k, self.cache.v):
            t[:, :, :, dst] = t[:, :, :, src].clone()
        self.mask[:, dst] = self.mask[:, src].clone()
        self.mask[:, slice(0, d) if d > 0 else slice(end + d, end)] = 0  # the columns left behind
        self.start = [s + d for s in self.start]
        self.cache.length = end + d

    def _grow_or_compact(self) -> None:
        if self.cache.k.shape[3] < self.context:
            self._reserve(min(self.context, 2 * self.cache.k.shape[3]))
        else:  # every row in use began right of column 0 (see the module's docstring): drop the common left part
            self._shift(-min(self.start[i] for i, r in enumerate(self.slots) if r is not None))

    def _reserve(self, columns: int) -> None:
        """A larger cache (columns up to the context), holding what the current one holds."""
        old, end = self.cache, self.cache.length
        self.cache = KVCache(self.config, self.max_batch_size, columns, self.device, self.dtype)
        self.cache.k[:, :, :, :end], self.cache.v[:, :, :, :end] = old.k[:, :, :, :end], old.v[:, :, :, :end]
        self.cache.length = end
        mask = torch.zeros(self.max_batch_size, columns, dtype=torch.long, device=self.device)
        mask[:, :end] = self.mask[:, :end]
        self.mask = mask


# ------------------------------------------------------------------------------------------------ the HTTP side


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def chat_turns(messages: list[dict]) -> tuple[str, list[list[str]], str | None]:
    """(query, history pairs, system) from OpenAI chat messages: system messages first, then user and assistant
    turns in alternation, ending with the user's."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[len(system):]):
        raise APIError(400, "system messages must come before the conversation", "messages")
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise APIError(400, f"messages[{len(system) + i}] should be a {'user' if i % 2 == 0 else 'assistant'} "
                                "message: after the system messages, user and assistant alternate", "messages")
    if not turns or turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    return turns[-1]["content"], history, "\n".join(system) if system else None


class Body(BaseModel):
    """What the chat and completions requests share (OpenAI's names); an unknown field is an error."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionBody(Body):
    prompt: str | list[str]


def create_app(engine: Engine, template: Template, model_name: str, max_new_tokens: int = 512,
               temperature: float = 0.0, top_p: float = 1.0):
    """The FastAPI application; sampling fields a request leaves out take these defaults (phift's flags). Every
    answer ends at the template's stop token ids (eos, and a chat template's end token)."""
    app = FastAPI(title="phift", docs_url=None, redoc_url=None)
    created = int(time.time())
    stop_ids = tuple(stop_token_ids(template, engine.tokenizer))
    if engine.rope_switch is not None and engine.context == engine.rope_switch:
        limit = (f"This model's maximum context length is {engine.context} tokens here: phift api serves a LongRoPE "
                 f"model up to its original length, where every row of a batch keeps the same rotary factors")
    else:
        limit = f"This model's maximum context length is {engine.context} tokens"

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(APIError(400, "the body of the request is not valid JSON"))
        loc = [str(x) for x in first["loc"] if x != "body"]
        param = ".".join(loc) or None
        return error_response(APIError(400, f"{param + ': ' if param else ''}{first['msg']}", param,
                                       "invalid_value"))

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return error_response(APIError(e.status_code, str(e.detail), type="invalid_request_error",
                                       code="not_found" if e.status_code == 404 else None))

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "phift"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": engine.max_batch_size, "active": engine.active(), "queued": engine.queued()}

    def check_model(name: str):
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`", "model",
                           "model_not_found")

    def make_request(body: Body, prompt: list[int], stop: tuple[str, ...], prompt_param: str) -> Request:
        if not prompt:
            raise APIError(400, "the prompt is empty", prompt_param)
        if len(prompt) >= engine.context:
            raise APIError(400, f"{limit}. However, your prompt is {len(prompt)} tokens long.", prompt_param,
                           "context_length_exceeded")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = min(max_new_tokens, engine.context - len(prompt))
        elif len(prompt) + max_tokens > engine.context:
            raise APIError(400, f"{limit}. However, you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in "
                                f"the prompt, {max_tokens} for the completion).", "max_tokens",
                           "context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 sequences, none of them empty", "stop")
        return Request(prompt, max_tokens, body.temperature if body.temperature is not None else temperature,
                       body.top_p if body.top_p is not None else top_p, (*stop, *stops), stop_ids, body.n,
                       asyncio.get_running_loop(), asyncio.Queue())

    def submit(request: Request):
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded", "requests") from None

    async def run(http: HTTPRequest, requests: list[Request], body: Body, kind: str):
        """Submit the requests (prompt i's choices are indices i·n ... i·n + n − 1) and answer."""
        for r in requests:
            submit(r)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage():
            prompt_tokens = sum(len(r.prompt) * r.n for r in requests)
            completion_tokens = sum(r.completion_tokens for r in requests)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        head = {"id": rid, "created": int(time.time()), "model": model_name}

        async def events():
            """(choice index, text, finish) over all requests, until every choice has finished."""
            queues = [asyncio.ensure_future(r.events.get()) for r in requests]
            remaining = [r.n for r in requests]
            checked = time.monotonic()
            try:
                while any(remaining):
                    done, _ = await asyncio.wait([q for q, left in zip(queues, remaining) if left], timeout=1.0,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    # a stream learns of a disconnect from Starlette, which cancels it; an answer sent whole asks
                    if not body.stream and time.monotonic() - checked > 1.0:
                        checked = time.monotonic()
                        if await http.is_disconnected():
                            return
                    for k, q in enumerate(queues):
                        if q in done:
                            index, text, finish = q.result()
                            if finish is not None:
                                remaining[k] -= 1
                            if remaining[k]:
                                queues[k] = asyncio.ensure_future(requests[k].events.get())
                            yield k * body.n + index, text, finish
            finally:
                for q in queues:
                    q.cancel()
                for r in requests:  # a client that has gone leaves the pool; a finished request is unaffected
                    engine.cancel(r)

        if not body.stream:
            texts = collections.defaultdict(str)
            finishes = {}
            async for index, text, finish in events():
                if finish == "error":
                    raise APIError(500, f"generation failed: {text}", type="server_error")
                texts[index] += text
                if finish:
                    finishes[index] = finish
            if len(finishes) < sum(r.n for r in requests):  # the client left
                return JSONResponse({}, status_code=499)
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": f,
                        "logprobs": None} if kind == "chat" else
                       {"index": i, "text": texts[i], "finish_reason": f, "logprobs": None}
                       for i, f in sorted(finishes.items())]
            return {**head, "object": obj, "choices": choices, "usage": usage()}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def sse(choices, **extra) -> str:
            chunk = {**head, "object": f"{obj}.chunk" if kind == "chat" else obj, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        def choice(index, text, finish):
            if kind == "chat":
                return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish,
                        "logprobs": None}
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

        async def stream():
            if kind == "chat":
                yield sse([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                            "logprobs": None} for i in range(sum(r.n for r in requests))])
            async for index, text, finish in events():
                if finish == "error":
                    err = APIError(500, f"generation failed: {text}", type="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if text and finish:  # the last text, then the finish reason alone, as OpenAI sends them
                    yield sse([choice(index, text, None)])
                    text = ""
                if text or finish:
                    yield sse([choice(index, text, finish)])
            if include_usage:
                yield sse([], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def text_of(content) -> str:
        return content if isinstance(content, str) else "".join(p.text for p in content)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        check_model(body.model)
        query, history, system = chat_turns([{"role": m.role, "content": text_of(m.content)}
                                             for m in body.messages])
        prompt = encode_prompt(template, engine.tokenizer, query, history, system)
        return await run(http, [make_request(body, prompt, template.stop_words, "messages")], body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", "prompt")
        requests = [make_request(body, engine.tokenizer.encode(p), (), "prompt") for p in prompts]
        return await run(http, requests, body, "completion")

    return app


class BackgroundServer:
    """uvicorn serving `app` from a thread, on a port the OS picked (tests and the bench)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind((host, 0))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def serve(model, tokenizer, template: Template, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 16, max_queue: int = 256, **defaults) -> None:
    """Serve until interrupted."""
    import uvicorn

    engine = Engine(model, tokenizer, max_batch_size, max_queue).start_thread()
    try:
        uvicorn.run(create_app(engine, template, model_name, **defaults), host=host, port=port, log_level="info")
    finally:
        engine.stop()
