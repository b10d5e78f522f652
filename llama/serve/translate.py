"""OpenAI's chat requests in the library's terms: messages as a dialog, tools and tool_choice as what the prompt
shows and what the reply may or must be, response_format as a grammar, the sampling fields as SamplingParams; and
requests of the Responses API as the chat requests they amount to.

Every refusal is a `RequestError` naming the field at fault, raised before any work.
"""

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llama.chat_format import ChatFormat, Message
from llama.engine import SamplingParams
from llama.grammar import answer_grammar, response_schema, tool_call_grammar
from llama.serve.protocol import (ChatCompletionRequest, ChatMessage, FunctionName, NamedToolChoice, ResponseFormat,
                                   Tool)
from llama.tool_prompt import check_tools

if TYPE_CHECKING:
    from llama.serve.responses_protocol import ResponsesRequest


class RequestError(ValueError):
    """A request the server refuses (400), naming the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ToolUse:
    """What a chat request's tools make of the reply: the tools the prompt shows, whether the reply is read for
    calls, the grammar its text must match (None: free), and whether it may make several calls."""

    tools: list[dict]
    parse_calls: bool
    grammar: str | None
    parallel: bool


def dialog(messages: list[ChatMessage]) -> list[Message]:
    """The messages as the library's dialog: `developer` is the system role; an assistant's tool_calls carry
    their arguments parsed; a tool result's tool_call_id must answer a call made earlier in the conversation."""
    result: list[Message] = []
    calls_made: set[str] = set()
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        entry: Message = {"role": role, "content": message.text()}
        if message.tool_calls:
            if role != "assistant":
                raise RequestError(f"messages[{i}]: only assistant messages make tool calls", f"messages.{i}")
            entry["tool_calls"] = [_call(call, f"messages.{i}.tool_calls.{j}") for j, call in
                                   enumerate(message.tool_calls)]
            calls_made.update(call.id for call in message.tool_calls)
        if message.tool_call_id is not None and role in ("tool", "ipython"):
            if message.tool_call_id not in calls_made:  # without an id, a result follows Meta's built-in tools
                raise RequestError(f"messages[{i}]: tool_call_id {message.tool_call_id!r} answers no tool call of "
                                   "an earlier assistant message", f"messages.{i}.tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def _call(call: Any, param: str) -> dict:
    return {"id": call.id, "name": call.function.name,
            "arguments": json_arguments(call.function.arguments, f"{param}.function.arguments")}


def json_arguments(text: str, param: str) -> dict:
    """A call's arguments, given as the JSON text of an object (`param` names where), parsed."""
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise RequestError(f"{param} must be a JSON object as text, got {text!r}", param)
    return arguments


def tool_use(tools: list[Tool] | None, tool_choice: Any, parallel: bool, python_tag: bool) -> ToolUse:
    """The tools and tool_choice of a request (see `ToolUse`). `python_tag`: the vocabulary has Llama 3.1's
    <|python_tag|>, which a forced call may start with."""
    try:
        checked = check_tools([tool.function.model_dump(exclude_none=True) for tool in tools or []])
    except ValueError as error:
        raise RequestError(str(error), "tools") from None
    choice = "auto" if tool_choice is None else tool_choice
    if not checked:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            raise RequestError("tool_choice asks for a tool call, but the request has no tools", "tool_choice")
        return ToolUse([], False, None, parallel)
    if choice == "none":  # the reply is text: the prompt shows no tools
        return ToolUse([], False, None, parallel)
    if choice == "auto":
        return ToolUse(checked, True, None, parallel)
    forced = checked
    if isinstance(choice, NamedToolChoice):
        forced = [tool for tool in checked if tool["function"]["name"] == choice.function.name]
        if not forced:
            names = [tool["function"]["name"] for tool in checked]
            raise RequestError(f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                               f"({', '.join(names)})", "tool_choice")
    return ToolUse(checked, True, _grammar(lambda: tool_call_grammar(forced, python_tag), "tools"), parallel)


def reply_grammar(use: ToolUse, response_format: ResponseFormat | None, python_tag: bool,
                  schema_param: str = "response_format.json_schema.schema") -> str | None:
    """The grammar the reply must match (None: free). A call that tool_choice forces is no text: its grammar
    wins over a response format (the Agents SDK sends an agent's output type on every turn, tool_choice
    "required" included). Otherwise the response format's JSON (its schema named `schema_param` in errors), which
    under tool_choice "auto" a call of one of the tools may replace."""
    if use.grammar is not None:
        return use.grammar
    schema = _response_schema(response_format)
    if schema is None:
        return None
    tools = use.tools if use.parse_calls else None
    return _grammar(lambda: answer_grammar(schema, tools, python_tag, schema_param), schema_param)


def _response_schema(response_format: ResponseFormat | None) -> Any:
    try:
        return response_schema(response_format.model_dump(by_alias=True) if response_format else None)
    except ValueError as error:
        raise RequestError(str(error), "response_format.json_schema") from None


def chat_prompt(formatter: ChatFormat, messages: list[Message], use: ToolUse, tool_format: str,
                date_string: str | None, messages_param: str) -> list[int]:
    """The prompt tokens of a dialog with the tools `use` shows (`messages_param` names the request's messages)."""
    try:
        if use.tools:
            formatter.check_takes_tools()
    except ValueError as error:
        raise RequestError(str(error), "tools") from None
    try:
        return formatter.encode_dialog_prompt(messages, use.tools or None, tool_format, date_string)
    except ValueError as error:
        raise RequestError(str(error), messages_param) from None


def _grammar(build: Any, param: str) -> str:
    try:
        return build()
    except ValueError as error:
        raise RequestError(str(error), param) from None


def sampling(body: ChatCompletionRequest | Any, max_tokens: int, vocab_size: int, grammar: str | None,
             logprobs: bool = False, top_logprobs: int = 0, echo_logprobs: bool = False) -> SamplingParams:
    """The SamplingParams of a request's sampling fields."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or not 0 <= int(key) < vocab_size:
            raise RequestError(f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        bias[int(key)] = value
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, logprobs=logprobs,
                          top_logprobs=top_logprobs, echo_logprobs=echo_logprobs, logit_bias=bias or None,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          grammar=grammar)


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of each of n choices: a given seed is the first choice's, the next ones take the seeds after it
    (n choices of one seed would be n copies of one text)."""
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]


def conversation(body: "ResponsesRequest") -> list[Message]:
    """A Responses request's instructions and input items as the library's dialog: the instructions first, as the
    system message; `developer` read as `system`; consecutive function calls as one assistant message's tool_calls;
    each function_call_output as a tool message answering a call made earlier in the input."""
    result: list[Message] = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    calls_made: set[str] = set()
    for i, item in enumerate(body.input):
        if item.type == "message":
            result.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
        elif item.type == "function_call":
            call = {"id": item.call_id, "name": item.name,
                    "arguments": json_arguments(item.arguments, f"input.{i}.arguments")}
            if not (result and result[-1].get("tool_calls")):
                result.append({"role": "assistant", "content": "", "tool_calls": []})
            result[-1]["tool_calls"].append(call)
            calls_made.add(item.call_id)
        else:
            if item.call_id not in calls_made:
                raise RequestError(f"input[{i}]: call_id {item.call_id!r} answers no function_call earlier in input",
                                   f"input.{i}.call_id")
            result.append({"role": "tool", "content": item.text(), "tool_call_id": item.call_id})
    return result


def responses_prompt(body: "ResponsesRequest", formatter: ChatFormat, tool_format: str,
                     python_tag: bool) -> tuple[list[int], ToolUse, str | None]:
    """The prompt tokens of a Responses request, how its reply uses tools, and the grammar it must match (see
    `reply_grammar`: text.format is the response format)."""
    tools = [Tool(type="function", function=tool.model_dump(exclude={"type"})) for tool in body.tools or []]
    choice = body.tool_choice  # a string, None, or a function's {"type", "name"}, which chat nests
    if choice is not None and not isinstance(choice, str):
        choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
    use = tool_use(tools, choice, body.parallel_tool_calls, python_tag)
    grammar = reply_grammar(use, _response_format(body), python_tag, "text.format.schema")
    return chat_prompt(formatter, conversation(body), use, tool_format, None, "input"), use, grammar


def _response_format(body: "ResponsesRequest") -> ResponseFormat | None:
    """text.format as chat's response_format (its json_schema fields are those of text.format itself)."""
    given = body.text.format if body.text else None
    if given is None:
        return None
    return ResponseFormat(type=given.type, json_schema=given if given.type == "json_schema" else None)
