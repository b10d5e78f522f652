"""What goes over the wire, in OpenAI's shapes.

Requests are pydantic models: OpenAI's fields (others are ignored, not refused), with OpenAI's ranges, so that a bad
value is a 400 naming the field before any work. Replies are TypedDicts, plain dicts at run time, so that the JSON
keeps its fields in the order they are written here; the functions at the end build the shapes that need more than
their fields' values.
"""

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # as OpenAI allows


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Request(_Body):
    """A request's top level: a field the server does not know is refused by name, as OpenAI refuses it; those of
    `UNSUPPORTED` are refused with a reason, and those of `LABELS` (they only label or store a request) are
    accepted and ignored."""

    LABELS: ClassVar[tuple[str, ...]] = ("user", "metadata", "store", "service_tier", "safety_identifier",
                                         "prompt_cache_key")
    UNSUPPORTED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in data:
            if name in cls.UNSUPPORTED and data[name] is not None:
                raise PydanticCustomError("unsupported", "{field} is not supported: {reason}",
                                          {"field": name, "reason": cls.UNSUPPORTED[name]})
            if name not in cls.model_fields and name not in cls.LABELS and name not in cls.UNSUPPORTED:
                raise PydanticCustomError("unrecognized", "unrecognized field '{field}' (see README for the fields this server takes)", {"field": name})
        return data


class TextPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallIn(_Body):
    """A call an earlier assistant message made."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this result answers

    def text(self) -> str:
        """The content as one string: a list of text parts is joined, no content is ""."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionDefinition(_Body):
    name: str  # checked, with the rest of the tool, by llama.tool_prompt.check_tools
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = {}  # pydantic's own `schema` name is taken
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatTemplateKwargs(_Body):
    date_string: str | None = None  # Llama 3.1's "Today Date:" line (vLLM's name); default: today


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None
MAX_CHOICES = 16  # n


class _Sampling(_Request):
    """What both completion endpoints share."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: Stop = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # what a torch.Generator takes
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]  # an empty stop string would end every reply at once

    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    UNSUPPORTED = {"audio": "the model reads and writes text only",
                   "functions": "send tools", "function_call": "send tool_choice",
                   "prediction": "predicted outputs are not implemented",
                   "web_search_options": "the server does not search the web",
                   "reasoning_effort": "Llama 3.x does not reason apart from its answer",
                   "verbosity": "the length of an answer is set with max_completion_tokens"}

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    modalities: list[Literal["text"]] | None = None  # the model writes text only


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    UNSUPPORTED = {"suffix": "the model completes text at its end only"}

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] = 16  # OpenAI's default
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None  # as many as n: the server returns every choice it makes


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ReplyHeader(TypedDict):
    """The fields every reply and chunk of one request shares."""

    id: str
    object: str  # "chat.completion", "chat.completion.chunk" or "text_completion"
    created: int
    model: str


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes, which `token` may show only as U+FFFD


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(TypedDict):
    """Parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for a prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token's text starts in the choice's text


class FunctionCall(TypedDict):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(TypedDict, total=False):
    """A streamed piece of call `index`: its first piece has the id, type and name, later ones add arguments."""

    index: int
    id: str
    type: Literal["function"]
    function: dict[str, str]


class AssistantMessage(TypedDict, total=False):
    role: Literal["assistant"]
    content: str | None  # None when the reply is tool calls
    tool_calls: list[ToolCallOut]


class ChatDelta(TypedDict, total=False):
    """What a chat chunk adds to the message: the first one the role, the last one nothing."""

    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallDelta]


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class CompletionChoice(TypedDict):
    """A whole choice, or a streamed piece of one."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class _StreamUsage(TypedDict, total=False):
    usage: Usage | None  # with stream_options.include_usage: None but in the last chunk, which has no choices


class ChatCompletion(ReplyHeader):
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(ReplyHeader, _StreamUsage):
    choices: list[ChatChunkChoice]


class Completion(ReplyHeader):
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(ReplyHeader, _StreamUsage):
    choices: list[CompletionChoice]


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None  # the request's field at fault
    code: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def reply_header(kind: str, model: str) -> ReplyHeader:
    """A new reply's header: `kind` is "chat.completion" or "text_completion"."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return ReplyHeader(id=f"{prefix}-{uuid.uuid4().hex}", object=kind, created=int(time.time()), model=model)


def chat_chunk(header: ReplyHeader, delta: ChatDelta, finish_reason: str | None = None,
               logprobs: ChatLogprobs | None = None, index: int = 0) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
    return {**header, "object": "chat.completion.chunk", "choices": [choice]}


def completion_chunk(header: ReplyHeader, index: int, text: str, finish_reason: str | None = None,
                     logprobs: CompletionLogprobs | None = None) -> CompletionChunk:
    choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)
    return {**header, "choices": [choice]}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorBody:
    """The body of an error with HTTP status `status`."""
    return ErrorBody(error=ErrorDetail(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                                       param=param, code=code))
