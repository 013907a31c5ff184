"""``bucketchat serve``: the chat engine over HTTP (Starlette + uvicorn, both already in Prefect's tree).

    POST /v1/chat/completions   OpenAI-compatible; ``stream: true`` sends server-sent events
    GET  /v1/models             the one model served
    GET  /healthz               liveness, with the model and table it serves
    GET  /                      a small chat page (interfaces/static/index.html), no build step

The answer is always a stored response (styled per --style_mode), so sampling parameters such as
``temperature``, ``top_p`` or ``max_tokens`` are accepted and ignored; what cannot be honoured
(``n`` > 1, tools, non-text content) is refused with a 400. ``seed`` seeds sampling and the
creative style. Add ``"explain": true`` to a request to get the "why" (buckets, candidates, source
records) in the response's ``bucketchat`` field.

Bounds, so a flood cannot take the process down: request bodies over ``max_body_bytes`` get 413,
more than ``max_concurrency`` answers in flight get 429, messages are capped in number and length.
Every error is a JSON body in OpenAI's shape ({"error": {"message", "type", "param", "code"}}).
The model and table are loaded once, before the server starts; answers run on a small thread pool,
in each of the ``--workers`` processes interfaces/serving.py runs the app on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conversations.text import MAX_MESSAGE_CHARS, TextError, clean_text
from interfaces.api_error import ApiError, error_response
from retrieval.answer import ChatEngine
from retrieval.review import BELOW, SIMILARITY
from retrieval.styles import STYLES

PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no key needed
    max_concurrency: int = 64  # answers in flight (running or queued); more get 429
    threads: int = 2  # threads answering in each process (torch runs one thread each)
    workers: int = 1  # processes answering on the one socket (interfaces/serving.py)
    max_body_bytes: int = 64 * 1024
    max_messages: int = 64
    max_message_chars: int = MAX_MESSAGE_CHARS
    model_name: str = "bucketchat"
    drop_dir: str = "data/drops"  # where the review view writes its decisions (the retrain folder)
    review_below: float = BELOW  # the review lists answers less confident than this (retrieval/review.py)
    review_similarity: float = SIMILARITY

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.max_concurrency < 1:
            raise ValueError(f"--max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.threads < 1:
            raise ValueError(f"--workers_threads must be at least 1, got {self.threads}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError(
                "--api_key is shorter than 8 characters; use a long random string (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
            )


def _text(content, i: int, limit: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds - {"text"}:
            raise ApiError(
                400,
                f"messages[{i}].content has parts of type {sorted(k for k in kinds if k != 'text')}; only text is supported",
                f"messages[{i}].content",
            )
        text = " ".join(str(p.get("text", "")) for p in content)
    else:
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
    try:
        return clean_text(text, f"messages[{i}].content", limit)
    except TextError as exc:
        if exc.code == "empty":
            return ""  # only the last (user) message must have text; checked by the caller
        raise ApiError(400, str(exc), f"messages[{i}].content", "message_too_long" if exc.code == "too_long" else "invalid_text") from None


def parse_request(body: dict, cfg: ServerConfig) -> dict:
    """Validate a chat completion request; returns the message, the earlier user turns and options."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > cfg.max_messages:
        raise ApiError(400, f"{len(messages)} messages; the limit is {cfg.max_messages} (send the recent turns only)", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        turns.append((m["role"], _text(m.get("content", ""), i, cfg.max_message_chars) if m.get("content") not in (None, "") else ""))
    if turns[-1][0] != "user" or not turns[-1][1].strip():
        raise ApiError(400, "the last message must be a non-empty user message: it is what gets answered", f"messages[{len(turns) - 1}]")
    for key, ok, why in (
        ("n", body.get("n", 1) in (1, None), "only n=1 is supported: there is one best stored response"),
        (
            "tools",
            not body.get("tools") and not body.get("functions"),
            "tools and functions are not supported: answers are stored responses",
        ),
    ):
        if not ok:
            raise ApiError(400, why, key)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, 'only response_format {"type": "text"} is supported', "response_format")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        raise ApiError(400, "'seed' must be an integer from 0 to 4294967295", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    conversation = body.get("conversation_id")
    if conversation is not None and (not isinstance(conversation, str) or not 0 < len(conversation) <= 200):
        raise ApiError(400, "'conversation_id' must be a string of 1 to 200 characters", "conversation_id")
    return {
        "conversation": conversation,
        "message": turns[-1][1],
        "history": [t for role, t in turns[:-1] if role == "user" and t.strip()],
        "stream": stream,
        "seed": seed,
        "explain": bool(body.get("explain", False)),
        "style_mode": body.get("style_mode") if isinstance(body.get("style_mode"), str) and body["style_mode"] in STYLES else None,
    }


def create_app(engine: ChatEngine, cfg: ServerConfig | None = None) -> Starlette:
    """The ASGI app around one loaded engine (tests run it with uvicorn on a free port)."""
    cfg = cfg or ServerConfig()
    pool = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="bucketchat-answer")
    in_flight = 0
    pinned = engine.meta.get("table") or {}
    created = int(time.time())

    def check_auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), cfg.api_key.encode())):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key", kind="authentication_error"
            )

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():  # also bounds chunked bodies that declare no length
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes", code="body_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc.__class__.__name__})", code="invalid_json") from None

    async def completions(request: Request) -> Response:
        nonlocal in_flight
        check_auth(request)
        req = parse_request(await read_json(request), cfg)
        if in_flight >= cfg.max_concurrency:
            raise ApiError(
                429,
                f"more than {cfg.max_concurrency} requests in flight; retry shortly",
                code="rate_limited",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            ans = await loop.run_in_executor(
                pool,
                lambda: engine.answer(
                    req["message"], history=req["history"], style_mode=req["style_mode"], seed=req["seed"], conversation=req["conversation"]
                ),
            )
            why = await loop.run_in_executor(pool, engine.explain, ans) if req["explain"] else None
        finally:
            in_flight -= 1
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        extra = {
            "bucket": ans.bucket,
            "confidence": ans.confidence,
            "margin": ans.margin,
            "fallback": ans.fallback,
            "style": ans.style,
            "context": ans.context,
            "candidates": ans.candidates,
            "latency_ms": ans.latency_ms,
            "turn_id": ans.turn,  # for POST /v1/feedback (None with --no_log)
        } | ({"why": why} if why else {})
        words = max(1, len(ans.response.split()))
        usage = {"prompt_tokens": sum(len(t.split()) for t in req["history"] + [req["message"]]), "completion_tokens": words}
        usage["total_tokens"] = usage["prompt_tokens"] + words
        if not req["stream"]:
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": now,
                    "model": cfg.model_name,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": ans.response}, "finish_reason": "stop", "logprobs": None}
                    ],
                    "usage": usage,
                    "bucketchat": extra,
                }
            )

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": cfg.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **more,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            pieces = ans.response.split(" ")
            for i in range(0, len(pieces), 4):  # a few words per event, as a model would stream tokens
                yield chunk({"content": " ".join(pieces[i : i + 4]) + (" " if i + 4 < len(pieces) else "")})
            yield chunk({}, "stop", bucketchat=extra)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse(
            {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": created, "owned_by": "bucketchat"}]}
        )

    async def feedback(request: Request) -> Response:
        """POST {"turn_id": ID, "rating": "good" | "bad"}: a rating of an answer (its ``turn_id``),
        kept with the turn in the conversation log."""
        check_auth(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"turn_id": "...", "rating": "good"}', code="invalid_request")
        if engine.turn_log is None:
            raise ApiError(409, "this server keeps no conversation log (started with --no_log); feedback has nowhere to go", code="no_log")
        try:
            conversation = body.get("conversation_id")
            conversation = conversation if isinstance(conversation, str) and len(conversation) <= 200 else None
            engine.turn_log.feedback(body.get("turn_id"), body.get("rating"), conversation=conversation)
        except ValueError as exc:
            raise ApiError(400, str(exc), "rating" if "rating" in str(exc) else "turn_id") from None
        return JSONResponse({"ok": True})

    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": cfg.model_name,
                "model_size": engine.head.cfg.model_size,
                "table": {"name": pinned.get("name"), "version": pinned.get("version")},
                "in_flight": in_flight,
                "worker": os.getpid(),  # which of the --workers processes answered
            }
        )

    async def page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html")

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind, exc.headers)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(
            exc.status_code, exc.detail or "request failed", kind="not_found_error" if exc.status_code == 404 else "invalid_request_error"
        )

    async def on_crash(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error ({exc.__class__.__name__}); the server logs have the details", kind="server_error")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
    ]
    from interfaces.review_api import review_routes

    routes += review_routes(engine, cfg, check_auth, read_json, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    return Starlette(
        routes=routes, exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash}, lifespan=lifespan
    )
