"""A request of OpenAI's Responses API (/v1/responses), built on protocol.py's request models: each field is
honoured, refused by name with a reason, or (when it only labels or stores a request) accepted and ignored.

The server keeps no state: a request carries the whole conversation in `input`, as messages, the function calls
the model made and their outputs.
"""

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from llama.serve.protocol import JsonSchemaFormat, _Body, _Request

STATELESS = "this server keeps no state: send the whole conversation in input"
LOGPROBS = "message.output_text.logprobs"  # the one `include` value that adds to what this server returns


def _only_types(allowed: tuple[str, ...], what: str, reason: str) -> BeforeValidator:
    """Refuses a dict whose "type" is not one of `allowed`, naming the type (a missing one is `allowed[0]`)."""

    def check(value: Any) -> Any:
        kind = value.get("type", allowed[0]) if isinstance(value, dict) else allowed[0]
        if kind not in allowed:
            raise PydanticCustomError("unsupported", "{what} of type {kind} are not supported: {reason}",
                                      {"what": what, "kind": repr(kind), "reason": reason})
        return value

    return BeforeValidator(check)


class InputText(_Body):
    type: Literal["input_text", "output_text"]  # output_text: an earlier reply's text, sent back
    text: str


def _as_parts(value: Any) -> Any:
    """Text given as one string, as the one text part it stands for."""
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError("text", "must be a string or a list of text parts")
    return value


TextPart = Annotated[InputText, _only_types(("input_text", "output_text"), "content parts",
                                            "the model reads text only")]
Content = Annotated[list[TextPart], BeforeValidator(_as_parts)]


class MessageItem(_Body):
    type: Literal["message"] = "message"  # a message may also come as a bare {"role", "content"}
    role: Literal["user", "system", "developer", "assistant"]
    content: Content

    def text(self) -> str:
        return "".join(part.text for part in self.content)


class FunctionCallItem(_Body):
    """A call the model made in an earlier turn, sent back."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON object, as text


class FunctionCallOutputItem(_Body):
    """What a call returned: it answers the function_call with the same call_id."""

    type: Literal["function_call_output"]
    call_id: str
    output: Content

    def text(self) -> str:
        return "".join(part.text for part in self.output)


def _item_type(value: Any) -> str:
    """Which item `value` is: its "type"; a message may come without one."""
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


ITEM_TYPES = ("message", "function_call", "function_call_output")
InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")] |
                      Annotated[FunctionCallOutputItem, Tag("function_call_output")], Discriminator(_item_type),
                      _only_types(ITEM_TYPES, "input items", f"the server takes {', '.join(ITEM_TYPES)} items, "
                                  "and keeps no state to look an item_reference up in")]


def _as_messages(value: Any) -> Any:
    """An input given as one string, as the user message it stands for."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise PydanticCustomError("input", "must be a string or a list of items")
    return value


class FunctionTool(_Body):
    """A function tool in the Responses shape (flat: no nested "function")."""

    type: Literal["function"]
    name: str  # checked, with the rest of the tool, by llama.tool_prompt.check_tools
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(JsonSchemaFormat):
    """text.format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema", ...}."""

    type: Literal["text", "json_object", "json_schema"]


class TextConfig(_Body):
    format: TextFormat | None = None


# Values refused with the reason: the field (a path), whether a value of it is refused, and why.
REFUSED_VALUES = [
    ("background", lambda value: value is True, "the server answers in the foreground only"),
    ("truncation", lambda value: value == "auto", "it would drop input items; send an input that fits the context"),
    ("reasoning.effort", lambda value: value not in (None, "none"), "Llama 3.x does not reason apart from its answer"),
    ("text.verbosity", lambda value: value is not None, "the length of an answer is set with max_output_tokens"),
    ("tool_choice.type", lambda value: value not in (None, "function"), "the server runs function tools only"),
]


class ResponsesRequest(_Request):
    LABELS = (*_Request.LABELS, "prompt_cache_retention", "prompt_cache_options",
              "stream_options")  # stream_options.include_obfuscation pads deltas; none are padded here
    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "previous_response_id": STATELESS, "conversation": STATELESS,
        "prompt": "stored prompt templates are not served: send instructions and input",
        "context_management": "the server does not compact conversations",
        "background_options": "the server answers in the foreground only"}

    model: str | None = None
    metadata: dict[str, str] | None = None  # echoed, as it labels the request
    input: Annotated[list[InputItem], Field(min_length=1), BeforeValidator(_as_messages)]
    instructions: str | None = None
    tools: list[Annotated[FunctionTool, _only_types(("function",), "tools", "the server runs function tools only "
                                                    "(their calls are returned to you)")]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None  # counts built-in tool calls: the server has none
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include: list[str] | None = None  # of OpenAI's values only message.output_text.logprobs names what is made here
    reasoning: dict[str, Any] | None = None  # without an effort, a summary of no reasoning is nothing
    truncation: Literal["disabled"] | None = None
    background: bool | None = None  # true is refused (REFUSED_VALUES)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refused_values(cls, data: Any) -> Any:
        for field, refuse, reason in REFUSED_VALUES if isinstance(data, dict) else []:
            value = data
            for key in field.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if refuse(value):
                raise PydanticCustomError("unsupported", "{field} {value} is not supported: {reason}",
                                          {"field": field, "value": repr(value), "reason": reason})
        return data

    def logprobs(self) -> bool:
        """Whether output text carries its tokens' logprobs."""
        return LOGPROBS in (self.include or []) or bool(self.top_logprobs)

    def echo(self) -> dict[str, Any]:
        """What a Response repeats of its request, in the Response's shapes."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, FunctionChoice) else self.tool_choice
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "parallel_tool_calls": self.parallel_tool_calls, "temperature": self.temperature,
                "text": {"format": _format_echo(self.text.format if self.text else None)},
                "tool_choice": choice or "auto",
                "tools": [tool.model_dump(exclude_none=True) for tool in self.tools or []],
                "top_logprobs": self.top_logprobs or 0, "top_p": self.top_p, "metadata": self.metadata or {}}


def _format_echo(given: TextFormat | None) -> dict[str, Any]:
    if given is None or given.type != "json_schema":
        return {"type": given.type if given else "text"}
    return given.model_dump(by_alias=True, exclude_none=True)
