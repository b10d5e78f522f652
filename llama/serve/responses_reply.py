"""A chat reply's chunks (reply_assembly.ChatReply.chunks) as OpenAI's Responses API returns a reply: the Response
object, whole or as its typed server-sent events, each numbered in order.

A text reply is one `message` item with one `output_text` part; a reply that calls tools is one `function_call`
item per call. A reply cut by max_output_tokens leaves the response "incomplete", and its stream ends with
`response.incomplete` instead of `response.completed`.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from llama.serve.protocol import ChatCompletionChunk

if TYPE_CHECKING:
    from llama.serve.responses_protocol import ResponsesRequest


class OutputText(TypedDict):
    type: Literal["output_text"]
    text: str
    annotations: list
    logprobs: list[dict]  # chat's logprob entries: token, logprob, bytes, top_logprobs


class OutputMessage(TypedDict):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: str  # "in_progress", "completed" or "incomplete"
    content: list[OutputText]


class FunctionCallOut(TypedDict):
    id: str
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    status: str


class InputTokensDetails(TypedDict):
    cached_tokens: int
    cache_write_tokens: int


class ResponseUsage(TypedDict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class Response(TypedDict):
    id: str
    object: Literal["response"]
    created_at: int
    status: str  # "in_progress", "completed" or "incomplete"
    completed_at: int | None
    error: None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | FunctionCallOut]
    parallel_tool_calls: bool
    previous_response_id: None
    reasoning: dict[str, None]
    temperature: float
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict]
    top_logprobs: int
    top_p: float
    truncation: Literal["disabled"]
    usage: ResponseUsage | None
    metadata: dict[str, str]
    background: bool


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_header(request: "ResponsesRequest", model: str) -> Response:
    """A new Response to `request`, in progress and with no output yet."""
    return {"id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "completed_at": None, "error": None, "incomplete_details": None, "model": model, "output": [],
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "truncation": "disabled",
            "usage": None, "background": False, **request.echo()}


def response_usage(input_tokens: int, output_tokens: int) -> ResponseUsage:
    return ResponseUsage(input_tokens=input_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                         output_tokens=output_tokens, output_tokens_details={"reasoning_tokens": 0},
                         total_tokens=input_tokens + output_tokens)


class ResponseReply:
    """A chat reply's chunks as a Response: whole, or as the Responses API's typed events, numbered in order."""

    def __init__(self, response: Response):
        self.response = response  # the header: what the Response echoes of the request; filled in as chunks come
        self.sequence_number = 0
        self.message: OutputMessage | None = None  # the text item, once the reply has text
        self.calls: dict[int, FunctionCallOut] = {}  # the chat chunks' call index -> its item

    async def whole(self, chunks: AsyncIterator[ChatCompletionChunk]) -> Response:
        async for _ in self.events(chunks):
            pass
        return self.response

    async def stream(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[str]:
        """The events as server-sent events, each named by an `event:` line."""
        async for event in self.events(chunks):
            yield _sse(event)

    def failure(self, error: Exception) -> str:
        """The event that says a stream failed after it began."""
        return _sse(self._event("error", code="server_error", message=str(error), param=None))

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    async def events(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[dict]:
        """response.created and .in_progress, each output item's events, then response.completed (or
        .incomplete, when the reply ran out of tokens)."""
        yield self._event("response.created", response=_copy(self.response))
        yield self._event("response.in_progress", response=_copy(self.response))
        async for chunk in chunks:
            if chunk.get("usage"):
                usage = chunk["usage"]
                self.response["usage"] = response_usage(usage["prompt_tokens"], usage["completion_tokens"])
            for choice in chunk["choices"]:
                for event in self._choice_events(choice):
                    yield event
        final = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        yield self._event(final, response=_copy(self.response))

    def _choice_events(self, choice: Any) -> list[dict]:
        """The events of one chat chunk's choice: text, call heads and arguments, and the end of every item."""
        delta, events = choice["delta"], []
        logprobs = (choice["logprobs"] or {}).get("content", [])
        if delta.get("content") or logprobs:
            events += self._text(delta.get("content", ""), logprobs)
        for call in delta.get("tool_calls", []):
            events += self._call(call)
        if choice["finish_reason"] is not None:
            if self.message is None and not self.calls:  # an empty reply is an empty message
                events += self._text("", [])
            events += self._finish(choice["finish_reason"])
        return events

    def _add(self, item: Any) -> dict:
        self.response["output"].append(item)
        return self._event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                           item=_copy(item))

    def _text(self, text: str, logprobs: list) -> list[dict]:
        events = []
        if self.message is None:
            self.message = OutputMessage(id=new_id("msg"), type="message", role="assistant", status="in_progress",
                                         content=[])
            events.append(self._add(self.message))
            part = OutputText(type="output_text", text="", annotations=[], logprobs=[])
            self.message["content"].append(part)
            events.append(self._event("response.content_part.added", **self._where(self.message), content_index=0,
                                      part=_copy(part)))
        part = self.message["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        events.append(self._event("response.output_text.delta", **self._where(self.message), content_index=0,
                                  delta=text, logprobs=logprobs))
        return events

    def _call(self, call: dict) -> list[dict]:
        if "id" in call:  # a call's first chunk: its id and name
            item = FunctionCallOut(id=new_id("fc"), type="function_call", call_id=call["id"],
                                   name=call["function"]["name"], arguments="", status="in_progress")
            self.calls[call["index"]] = item
            return [self._add(item)]
        item = self.calls[call["index"]]
        item["arguments"] += call["function"]["arguments"]
        return [self._event("response.function_call_arguments.delta", **self._where(item),
                            delta=call["function"]["arguments"])]

    def _finish(self, reason: str) -> list[dict]:
        """Every item done; the response's status: incomplete when the reply ran out of tokens."""
        status, events = "incomplete" if reason == "length" else "completed", []
        if self.message is not None:
            part, where = self.message["content"][0], self._where(self.message)
            self.message["status"] = status
            events += [self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                                   logprobs=part["logprobs"]),
                       self._event("response.content_part.done", **where, content_index=0, part=_copy(part)),
                       self._event("response.output_item.done", output_index=where["output_index"],
                                   item=_copy(self.message))]
        for item in self.calls.values():
            item["status"] = "completed"
            where = self._where(item)
            events += [self._event("response.function_call_arguments.done", **where, arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=where["output_index"],
                                   item=_copy(item))]
        self.response["status"] = status
        self.response["completed_at"] = int(time.time()) if status == "completed" else None
        self.response["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return events

    def _where(self, item: Any) -> dict:
        index = next(i for i, out in enumerate(self.response["output"]) if out is item)
        return {"item_id": item["id"], "output_index": index}


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def _copy(value: Any) -> Any:
    """A snapshot for an event: the reply's own items keep changing after it is sent."""
    return json.loads(json.dumps(value))
