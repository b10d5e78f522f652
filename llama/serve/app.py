"""The HTTP API: OpenAI's /v1/models, /v1/chat/completions, /v1/completions and /v1/responses, vLLM's tokenizer
endpoints, /health and Prometheus' /metrics, every error in OpenAI's shape."""

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from llama.request import PromptTooLong, SamplingParams, check_prompt
from llama.generation import Llama
from llama.serve.metrics import CONTENT_TYPE, Metrics
from llama.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                  error_body, reply_header)
from llama.serve.reply_assembly import ChatReply, CompletionReply, guarded
from llama.serve.responses_reply import ResponseReply, response_header
from llama.serve.responses_protocol import ResponsesRequest
from llama.serve.runner import Batch, EngineRunner, QueueFull, Stopping
from llama.serve.translate import (RequestError, ToolUse, chat_prompt, choices, dialog, reply_grammar,
                                   responses_prompt, sampling, tool_use)
from llama.tool_prompt import default_tool_format

MAX_BODY_BYTES = 16 * 2**20  # far above any prompt that fits a context; refuses a runaway upload early
UNGUARDED = ("/health", "/metrics")  # answered without the API key
DISCARD_BODY_FACTOR, DISCARD_SECONDS = 4, 30  # a refused upload is read and dropped up to 4 x the limit, 30 s


class ApiError(Exception):
    """A request the server refuses, said in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class Guard:
    """ASGI middleware run before routing: the API key (when one is set; not for the probes, /health and /metrics,
    which monitoring asks without keys) and the size of the body."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in UNGUARDED:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "a wrong API key" if given else "no API key (send it as 'Authorization: Bearer KEY')"
                return await _error_response(401, f"the request has {what}", code="invalid_api_key")(
                    scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            # A client that waits for "100 Continue" sends no body after a final answer: nothing to discard.
            upload = headers.get("expect", "").lower() != "100-continue"
            return await self._too_large(receive, send, received=0 if upload else None)
        body, more = bytearray(), True
        while more:  # read the body here (also when chunked) so that its size is known before any work
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(receive, send, received=len(body) if more else None)
        replayed = False

        async def replay():  # the body once, then the client's own messages (a disconnect, say)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, receive, send, received: int | None) -> None:
        """413 with `Connection: close`, then, while the client still uploads (`received` bytes of it so far), read
        and drop the rest before the response ends. Closing a socket with unread bytes makes the kernel send a
        reset instead of a clean close; the reset reaches a client that is still sending, which then sees a
        failed write (curl: "Connection reset by peer") or loses the answer it had not yet read. So the answer is
        sent at once and the connection is held open until the upload ends, for at most DISCARD_BODY_FACTOR
        times the limit and DISCARD_SECONDS: a client that never stops cannot hold the server."""
        message = f"the request body is larger than {self.max_body_bytes} bytes"
        response = _error_response(413, message, headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": received is not None})
        if received is None:
            return

        async def discard(received: int) -> None:
            while received <= DISCARD_BODY_FACTOR * self.max_body_bytes:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                received += len(message.get("body", b""))

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(discard(received), DISCARD_SECONDS)
        await send({"type": "http.response.body", "body": b""})  # uvicorn closes the connection after this


def _invalid(errors: list) -> ApiError:
    """The first of pydantic's complaints about a body, as a 400 naming the field."""
    first = errors[0] if errors else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    refused = first.get("ctx", {}).get("field")  # a top-level field refused by name: the message names it
    if refused:
        return ApiError(400, first["msg"], refused)
    param = ".".join(where) or None
    return ApiError(400, f"{param or 'the body'}: {first.get('msg', 'invalid')}", param)


async def parse(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The JSON body as `schema`, whatever its Content-Type says (curl -d sends a form's type)."""
    try:
        data = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise _invalid(error.errors()) from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        invalid = _invalid(error.errors())
        return _error_response(invalid.status, invalid.message, invalid.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else error.detail
        return _error_response(error.status_code, str(message), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        return _error_response(500, f"the server failed: {error}")


def create_app(llama: Llama, runner: EngineRunner, model_name: str, metrics: Metrics, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The application serving `llama` as `model_name`; `runner` steps its engine (in `runner.run()`'s thread) and
    reports its sequences to `metrics`."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(runner.stop)  # after the server finished its requests

    app = FastAPI(title="llama3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    _add_error_handlers(app)
    api = _Api(llama, runner, model_name)
    app.get("/health")(api.health)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    app.get("/v1/models")(api.models)
    app.get("/v1/models/{model}")(api.model)
    app.post("/tokenize")(api.tokenize)
    app.post("/detokenize")(api.detokenize)
    app.get("/tokenizer_info")(api.tokenizer_info)
    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/responses")(api.responses)
    return app


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (a write that failed included), so
    that its `finally` cancels the request's sequences at once, not whenever the generator is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(stream: AsyncIterator[str]) -> StreamingResponse:
    """A streamed reply of server-sent events; `stream` is an async generator (reply_assembly.guarded)."""
    return _EventStream(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Api:
    """The routes, over one model."""

    def __init__(self, llama: Llama, runner: EngineRunner, model_name: str):
        self.llama, self.runner, self.model_name = llama, runner, model_name
        self.tokenizer = llama.tokenizer
        self.max_seq_len = llama.model.args.max_seq_len
        self.tool_format = default_tool_format(llama.model.args.dim, llama.model.args.n_layers)
        self.created = int(time.time())

    async def health(self) -> dict:
        return {"status": "ok", "sequences": self.runner.outstanding}

    async def models(self) -> dict:
        return {"object": "list", "data": [await self.model(self.model_name)]}

    async def model(self, model: str) -> dict:
        self._check_model(model)
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama3",
                "max_model_len": self.max_seq_len}

    async def tokenize(self, request: Request) -> dict:
        body = await parse(request, TokenizeRequest)
        self._check_model(body.model)
        bos = body.add_special_tokens and self.tokenizer.add_bos
        tokens = self.tokenizer.encode(body.prompt, bos=bos, eos=False, allowed_special="all")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_seq_len}

    async def detokenize(self, request: Request) -> dict:
        body = await parse(request, DetokenizeRequest)
        self._check_model(body.model)
        try:
            return {"prompt": self.tokenizer.decode(body.tokens)}
        except ValueError as error:
            raise ApiError(400, str(error), "tokens") from None

    async def tokenizer_info(self) -> dict:
        tokenizer = self.tokenizer
        info = {"tokenizer_class": type(tokenizer.model).__name__, "vocab_size": tokenizer.n_words,
                "model_max_length": self.max_seq_len, "add_bos_token": tokenizer.add_bos,
                "bos_token": tokenizer.decode([tokenizer.bos_id]), "bos_token_id": tokenizer.bos_id,
                "eos_token": tokenizer.decode([tokenizer.eos_id]), "eos_token_id": tokenizer.eos_id,
                "stop_token_ids": sorted(tokenizer.stop_tokens)}
        if tokenizer.info and tokenizer.info.get("chat_template"):
            info["chat_template"] = tokenizer.info["chat_template"]
        return info

    async def chat(self, request: Request):
        body = await parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        try:
            prompt, use, grammar = self._chat_prompt(body)
            max_tokens = body.max_completion_tokens or body.max_tokens or self.max_seq_len
            self._check_prompts([prompt], max_tokens, "messages")
            top = body.top_logprobs or 0
            params = sampling(body, max_tokens, self.tokenizer.n_words, grammar, logprobs=body.logprobs,
                              top_logprobs=top if body.logprobs else 0)
        except RequestError as error:
            raise ApiError(400, str(error), error.param) from None
        reply = ChatReply(self.tokenizer, reply_header("chat.completion", self.model_name), body.stop_strings(),
                          body.logprobs, top, len(prompt), body.include_usage(), body.n, use.parse_calls,
                          use.parallel)
        batch = self._submit([prompt] * body.n, choices(params, body.n))
        return _sse(reply.stream(batch)) if body.stream else await _whole(reply.whole(batch), batch, request)

    def _chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], ToolUse, str | None]:
        """The prompt tokens of a chat request, how its reply uses tools, and the grammar the reply must match."""
        python_tag = self.tokenizer.python_tag_id is not None
        use = tool_use(body.tools, body.tool_choice, body.parallel_tool_calls, python_tag)
        grammar = reply_grammar(use, body.response_format, python_tag)
        date = body.chat_template_kwargs.date_string if body.chat_template_kwargs else None
        prompt = chat_prompt(self.llama.formatter, dialog(body.messages), use, self.tool_format, date, "messages")
        return prompt, use, grammar

    async def responses(self, request: Request):
        """OpenAI's Responses API, stateless: the request's whole conversation is a chat prompt, and the chat reply
        is returned as a Response (or its stream of events)."""
        body = await parse(request, ResponsesRequest)
        self._check_model(body.model)
        try:
            python_tag = self.tokenizer.python_tag_id is not None
            prompt, use, grammar = responses_prompt(body, self.llama.formatter, self.tool_format, python_tag)
            max_tokens = body.max_output_tokens or self.max_seq_len
            self._check_prompts([prompt], max_tokens, "input")
            params = SamplingParams(max_tokens, body.temperature, body.top_p, logprobs=body.logprobs(),
                                    top_logprobs=body.top_logprobs or 0, grammar=grammar)
        except RequestError as error:
            raise ApiError(400, str(error), error.param) from None
        chat = ChatReply(self.tokenizer, reply_header("chat.completion", self.model_name), stop=[],
                         logprobs=body.logprobs(), top_logprobs=body.top_logprobs or 0, prompt_len=len(prompt),
                         include_usage=True, parse_calls=use.parse_calls, parallel_tool_calls=use.parallel)
        reply = ResponseReply(response_header(body, self.model_name))
        batch = self._submit([prompt], [params])
        if body.stream:
            return _sse(guarded(reply.stream(chat.chunks(batch)), batch, reply.failure))
        return await _whole(reply.whole(chat.chunks(batch)), batch, request)

    async def completions(self, request: Request):
        body = await parse(request, CompletionRequest)
        self._check_model(body.model)
        if body.best_of not in (None, body.n):
            raise ApiError(400, f"best_of must equal n ({body.n}): every choice made is returned", "best_of")
        prompts, texts = self._prompts(body.prompt, body.max_tokens)
        logprobs = body.logprobs is not None
        try:
            params = sampling(body, body.max_tokens, self.tokenizer.n_words, None, logprobs=logprobs,
                              top_logprobs=body.logprobs or 0, echo_logprobs=logprobs and body.echo)
        except RequestError as error:
            raise ApiError(400, str(error), error.param) from None
        prompts, texts = [p for p in prompts for _ in range(body.n)], [t for t in texts for _ in range(body.n)]
        reply = CompletionReply(self.tokenizer, reply_header("text_completion", self.model_name),
                                body.stop_strings(), body.logprobs, body.echo, prompts, texts,
                                body.include_usage(), body.n)
        batch = self._submit(prompts, choices(params, body.n) * (len(prompts) // body.n))
        return _sse(reply.stream(batch)) if body.stream else await _whole(reply.whole(batch), batch, request)

    def _prompts(self, prompt, max_tokens: int) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt, checked: text gets BOS as Llama.text_completion gives it; ids are kept
        as they are."""
        if isinstance(prompt, str) or isinstance(prompt[0], str):
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = [self.tokenizer.encode(t, bos=self.tokenizer.add_bos, eos=False) for t in texts]
            self._check_prompts(prompts, max_tokens, "prompt")
            return prompts, texts
        prompts = [prompt] if isinstance(prompt[0], int) else prompt
        self._check_prompts(prompts, max_tokens, "prompt")
        return prompts, [self.tokenizer.decode(ids) for ids in prompts]

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def _check_prompts(self, prompts: list[list[int]], max_tokens: int, param: str) -> None:
        for index, prompt in enumerate(prompts):
            try:
                check_prompt(prompt, max_tokens, self.llama.model.args, f"prompt {index}")
            except PromptTooLong as error:
                raise ApiError(400, str(error), param, "context_length_exceeded") from None
            except ValueError as error:
                raise ApiError(400, str(error), param) from None

    def _submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Batch:
        try:
            return self.runner.submit(prompts, params)
        except QueueFull as error:
            raise ApiError(429, str(error), code="queue_full", headers={"Retry-After": "1"}) from None
        except Stopping as error:
            raise ApiError(503, str(error), code="shutting_down", headers={"Retry-After": "5"}) from None
        except ValueError as error:
            raise ApiError(400, str(error)) from None


async def _whole(reply: Coroutine[Any, Any, dict], batch: Batch, request: Request) -> dict | None:
    """Await a whole reply, unless the client leaves first: then its sequences are cancelled, freeing their slots."""
    replying = asyncio.ensure_future(reply)
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({replying, leaving}, return_when=asyncio.FIRST_COMPLETED)
        return replying.result() if replying.done() else None
    finally:
        for task in (replying, leaving):
            task.cancel()
        batch.cancel()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

