"""Tool calls in a Llama 3.x reply: every shape the models write, parsed into `ToolCall`s, and the check of the calls
an assistant message carries.

The shapes are those that llama-models' `ChatFormat.decode_assistant_message_from_content` reads, tried in its
order: `<function=name>{...}</function>`, a JSON object with `"name"` and `"parameters"` (or `"arguments"`), Llama
3.2's pythonic list `[f(a=1), g(b="x")]`, a built-in call `brave_search.call(query="...")`, and, after
`<|python_tag|>`, code for the code interpreter. Where that parser is looser or stricter, this one says why.
"""

import ast
import json
import re
import uuid
from typing import Any, TypedDict

CODE_INTERPRETER = "code_interpreter"
PYTHON_TAG = "<|python_tag|>"
_FUNCTION_TAG = re.compile(r"<function=([^>]+)>")
_FUNCTION_END = "</function>"
_CALL_KEYS = {"id", "name", "arguments"}


class ToolCall(TypedDict):
    """One call of a tool: `id` names it (a tool result answers it with `tool_call_id`), `arguments` is a JSON
    object."""

    id: str
    name: str
    arguments: dict[str, Any]


def new_call_id() -> str:
    """A fresh id for a call, in OpenAI's style."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, python_tag: bool = False) -> list[ToolCall]:
    """The tool calls that the reply `text` (without its stop token) makes; [] when it is an ordinary answer.

    `python_tag` says the reply began with `<|python_tag|>` (text that starts with the tag's own text counts too):
    then a reply in none of the call shapes is code for the code interpreter, as llama-models reads it.
    """
    if text.startswith(PYTHON_TAG):
        text, python_tag = text[len(PYTHON_TAG):], True
    body = text.strip(" ")
    for shape in (_function_tags, _json_call, _pythonic_list, _builtin_call):
        calls = shape(body.strip())
        if calls:
            return [{"id": new_call_id(), "name": name, "arguments": arguments} for name, arguments in calls]
    if python_tag:
        return [{"id": new_call_id(), "name": CODE_INTERPRETER, "arguments": {"code": body}}]
    return []


def _json_object(text: str) -> tuple[dict, int] | None:
    """The JSON object that `text` starts with, and where it ends. Like llama-models, single quotes are read as
    double quotes when the text is not JSON as it stands (swapping them keeps every index)."""
    for candidate in (text, text.replace("'", '"')):
        try:
            value, end = json.JSONDecoder().raw_decode(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value, end
    return None


def _function_tags(body: str) -> list[tuple[str, dict]] | None:
    """`<function=name>{...}</function>`, one or more, as the whole reply (the prompt asks for "no prefix or
    suffix"; llama-models takes the first tag found anywhere). The closing tag may be missing, as in llama-models'
    own test; unlike its regex, arguments may hold nested objects."""
    calls = []
    rest = body
    while rest:
        tag = _FUNCTION_TAG.match(rest)
        found = _json_object(rest[tag.end():]) if tag else None
        if found is None:
            return None
        arguments, end = found
        calls.append((tag.group(1).strip(), arguments))
        rest = rest[tag.end() + end:].lstrip()
        if rest.startswith(_FUNCTION_END):
            rest = rest[len(_FUNCTION_END):].lstrip()
    return calls or None


def _json_call(body: str) -> list[tuple[str, dict]] | None:
    """A whole reply that is one JSON object with a string `name` and `parameters` (Llama 3.1's word, and Meta's
    template's) or `arguments` (OpenAI's, which the models also write; as a JSON string too)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("parameters", value.get("arguments"))
    if isinstance(arguments, str):
        found = _json_object(arguments)
        arguments = found[0] if found and not arguments[found[1]:].strip() else None
    return [(value["name"], arguments)] if isinstance(arguments, dict) else None


def _keywords(call: ast.Call) -> dict[str, Any] | None:
    """A call's arguments when they are all keywords with literal values, else None."""
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        return None
    try:
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _expression(body: str) -> ast.expr | None:
    try:
        return ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _pythonic_list(body: str) -> list[tuple[str, dict]] | None:
    """Llama 3.2's `[f(a=1), g(b="x")]`: a non-empty list of calls of plain names with keyword arguments. Every
    call is returned; llama-models returns the first alone."""
    tree = _expression(body)
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for element in tree.elts:
        if not isinstance(element, ast.Call) or not isinstance(element.func, ast.Name):
            return None
        arguments = _keywords(element)
        if arguments is None:
            return None
        calls.append((element.func.id, arguments))
    return calls


def _builtin_call(body: str) -> list[tuple[str, dict]] | None:
    """A built-in tool's `name.call(query="...")` as the whole reply. llama-models finds the pattern anywhere in
    the text, so that a sentence quoting such a call became a call; here it must be all the reply says."""
    tree = _expression(body)
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Attribute) and tree.func.attr == "call"
            and isinstance(tree.func.value, ast.Name)):
        return None
    arguments = _keywords(tree)
    return [(tree.func.value.id, arguments)] if arguments is not None else None


def check_keys(value: Any, keys: set[str], where: str, needs: str) -> None:
    """Raise ValueError naming `where` unless `value` is a dict whose keys are among `keys` (`needs` names the
    ones it must have)."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a dict with {needs}, got {type(value).__name__}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys are {sorted(keys)}")


def check_tool_calls(calls: Any, where: str) -> None:
    """Raise ValueError naming `where` unless `calls` is a list of ToolCall dicts (`id` may be left out)."""
    if not isinstance(calls, list):
        raise ValueError(f"{where} tool_calls must be a list of {{'id', 'name', 'arguments'}} dicts, "
                         f"got {type(calls).__name__}")
    for index, call in enumerate(calls):
        at = f"{where} tool_calls[{index}]"
        check_keys(call, _CALL_KEYS, at, "'name' and 'arguments'")
        if not isinstance(call.get("name"), str) or not call["name"]:
            raise ValueError(f"{at} needs a 'name' that is a non-empty str, got {call.get('name')!r}")
        if not isinstance(call.get("arguments"), dict):
            raise ValueError(f"{at} 'arguments' must be a dict (a JSON object), got "
                             f"{type(call.get('arguments')).__name__}")
        if "id" in call and not isinstance(call["id"], str):
            raise ValueError(f"{at} 'id' must be a str, got {call['id']!r}")
