"""The HTTP face of ``nvl serve``: an OpenAI-compatible FastAPI app over a :class:`BatchEngine`.

Routes: ``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events, chunks as
OpenAI's), ``GET /v1/models``, ``GET /health``. Every error is OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx for the client's mistakes (a body that is
not JSON or names an unsupported field, a prompt past the context) and a 500 when generation fails;
the server answers the next request either way. fastapi is imported when the app is built.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (``Request``, imported
# inside create_app) as objects.
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from nvlcore.serve.engine import Answer, BatchEngine, Job
from nvlcore.serve.media import MediaResolver
from nvlcore.serve.protocol import ChatRequest, RequestError, parse_chat_request


def create_app(engine: BatchEngine, *, served_model_name: str, system_prompt: str | None = "/no_think",
               resolver: MediaResolver | None = None, log: Callable[[str], None] = print) -> Any:
    """The FastAPI application.

    :param served_model_name: the model id of ``/v1/models`` and of responses; a request naming
        another model gets a 404.
    :param system_prompt: the system turn added to conversations that have none (``nvl generate``'s
        ``--system-prompt``).
    :param log: one line per request.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    resolver = resolver or MediaResolver()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nvl serve", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Any:
        log(f"nvl serve: {exc.status} {request.method} {request.url.path}: {exc.message}")
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        err = RequestError(str(exc.detail), status=exc.status_code, code=str(exc.status_code))
        return await request_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return await request_error(request, RequestError(f"{where}: {first.get('msg', 'invalid')}", param=where))

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> Any:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "nvl"}
        if engine.generator.max_length is not None:
            card["max_model_len"] = engine.generator.max_length
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        t0 = time.perf_counter()
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model != served_model_name:  # before media are decoded or written
            raise RequestError(f"the model {model!r} does not exist; this server serves {served_model_name!r}",
                               param="model", code="model_not_found", status=404)
        req = await run_in_threadpool(parse_chat_request, body, resolver.part)
        req.conversation = _with_system_prompt(req.conversation, system_prompt)
        job = engine.submit(req)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if not req.stream:
            answer: Answer = await job.future
            _log_answer(log, answer, t0, stream=False)
            return _completion(ident, served_model_name, answer)
        first = await job.events.get()  # a refused prompt is still an HTTP error, not a stream
        if first[0] == "error":
            raise first[1]
        return StreamingResponse(_sse(job, first, ident, served_model_name, req, log, t0),
                                 media_type="text/event-stream")

    return app


def _with_system_prompt(conversation: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    from nvlcore.eval.runner import with_system_prompt

    return with_system_prompt(conversation, system_prompt)


def _log_answer(log: Callable[[str], None], answer: Answer, t0: float, *, stream: bool) -> None:
    log(f"nvl serve: 200 POST /v1/chat/completions{' (stream)' if stream else ''}: {answer.prompt_tokens} prompt + "
        f"{len(answer.token_ids)} completion tokens, {answer.finish_reason}, batch of {answer.batch_size}, "
        f"{time.perf_counter() - t0:.2f} s")


def _usage(answer: Answer) -> dict[str, int]:
    n = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": n, "total_tokens": answer.prompt_tokens + n}


def _completion(ident: str, model: str, answer: Answer) -> dict[str, Any]:
    return {
        "id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                     "finish_reason": answer.finish_reason}],
        "usage": _usage(answer),
    }


def _chunk(ident: str, model: str, delta: dict[str, Any] | None, finish: str | None = None,
           usage: dict[str, int] | None = None) -> str:
    obj: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "choices": []}
    if delta is not None:
        obj["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj)}\n\n"


async def _sse(job: Job, first: tuple[str, Any], ident: str, model: str, req: ChatRequest,
               log: Callable[[str], None], t0: float) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: the role, the text pieces, the finish reason, (usage), ``[DONE]``."""
    yield _chunk(ident, model, {"role": "assistant", "content": ""})
    event = first
    while True:
        kind, value = event
        if kind == "text":
            yield _chunk(ident, model, {"content": value})
        elif kind == "done":
            yield _chunk(ident, model, {}, finish=value.finish_reason)
            if req.include_usage:
                yield _chunk(ident, model, None, usage=_usage(value))
            _log_answer(log, value, t0, stream=True)
            break
        else:  # generation failed mid-stream: the status line is gone, the error goes in the stream
            log(f"nvl serve: {value.status} POST /v1/chat/completions (stream): {value.message}")
            yield f"data: {json.dumps(value.body())}\n\n"
            break
        event = await job.events.get()
    yield "data: [DONE]\n\n"
