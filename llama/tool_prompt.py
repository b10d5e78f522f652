"""Tools in a Llama 3.x prompt, in either of Meta's two formats, as (text, is_content) segments for ChatFormat.

- "json" (Llama 3.1 and 3.3, and what every Llama 3.x Instruct template on Hugging Face does): the dialog exactly
  as Meta's Jinja `chat_template` (tokenizer_config.json of Llama-3.1-8B-Instruct; 3.3-70B's is the same) renders
  it: `Environment: ipython` and the knowledge-date lines in the system message, the tools as JSON (indent 4, key
  order kept, non-ASCII as it is) in the first user message, calls as `{"name": ..., "parameters": ...}`, tool
  results as the `ipython` role, their content as a JSON string.
- "pythonic" (Llama 3.2 1B and 3B): the zero-shot prompt of llama-models' `llama3_2/text_prompt_format.md` in the
  system message, the functions as a JSON list, calls as `<|python_tag|>[f(a=1), g(b="x")]`.

A tool named `brave_search`, `wolfram_alpha` or `code_interpreter` is Meta's built-in: it goes on the `Tools:`
line (the code interpreter needs none: `Environment: ipython` turns it on), not in the JSON list, and is called as
`brave_search.call(query="...")` (the code interpreter: `<|python_tag|>` and the code).

Segments marked as content hold what users and models wrote (messages, tool schemas, calls): the caller encodes
them as plain text, so none of it can become a special token. Nothing here needs torch or a tokenizer.
"""

import json
import re
from collections.abc import Sequence
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: chat_format imports this module
    from llama.chat_format import Message

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "code_interpreter")
TOOL_FORMATS = ("json", "pythonic")
# (dim, n_layers) of Llama 3.2 1B and 3B, the models trained on the pythonic format.
LLAMA_3_2_SHAPES = {(2048, 16), (3072, 28)}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
Segments = list[tuple[str, bool]]

_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
_JSON_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
_PYTHONIC_PREAMBLE = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the function can be used, point it out. If the given question lacks the parameters required by "
    "the function,\nalso point it out. You should only return the function call in tools call sections.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1="
    "params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response.\n\n"
    "Here is a list of functions in JSON format that you can invoke.\n\n"
)


def check_tools(tools: Any) -> list[dict]:
    """`tools` (None, or a list of OpenAI function tools `{"type": "function", "function": {...}}` or of bare
    function dicts `{"name", "description", "parameters"}`) as OpenAI function tools, their keys in order.

    Raises ValueError naming the tool and what is wrong: a name missing, not unique or not 1-64 letters, digits,
    `_` or `-`; parameters that are not a JSON-schema object.
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of function tools, got {type(tools).__name__}")
    checked, names = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} must be a dict, got {type(tool).__name__}")
        if "type" in tool:
            if tool["type"] != "function" or not isinstance(tool.get("function"), dict) or len(tool) != 2:
                raise ValueError(f'{where} must be {{"type": "function", "function": {{...}}}} or a bare function '
                                 f'dict with a "name"; got the keys {sorted(tool)} and type {tool["type"]!r}')
            tool = tool["function"]
        _check_function(tool, where)
        if tool["name"] in names:
            raise ValueError(f"{where}: the name {tool['name']!r} is given twice; tool names must be unique")
        names.add(tool["name"])
        checked.append({"type": "function", "function": tool})
    return checked


def _check_function(function: dict, where: str) -> None:
    unknown = sorted(set(function) - _FUNCTION_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; a function has {sorted(_FUNCTION_KEYS)}")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where} needs a 'name' of 1 to 64 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(function.get("description", ""), str):
        raise ValueError(f"{where} ({name}) 'description' must be a str")
    parameters = function.get("parameters", {"type": "object"})
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ValueError(f'{where} ({name}) \'parameters\' must be a JSON-schema object ({{"type": "object", '
                         f'"properties": {{...}}}}), got {parameters!r}')
    if not isinstance(parameters.get("properties", {}), dict):
        raise ValueError(f"{where} ({name}) 'parameters' 'properties' must be a dict of JSON schemas")
    if not isinstance(parameters.get("required", []), list):
        raise ValueError(f"{where} ({name}) 'parameters' 'required' must be a list of property names")


def default_tool_format(dim: int, n_layers: int) -> str:
    """The tool format a model of this shape was trained on: "pythonic" for Llama 3.2 1B and 3B, else "json"."""
    return "pythonic" if (dim, n_layers) in LLAMA_3_2_SHAPES else "json"


def check_tool_format(tool_format: Any) -> str:
    """`tool_format`, when it is one of TOOL_FORMATS; else ValueError."""
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format must be one of {', '.join(TOOL_FORMATS)}, got {tool_format!r}")
    return tool_format


def today() -> str:
    """Today's date as Meta's template writes it (`strftime_now("%d %b %Y")`), e.g. "07 Dec 2026"."""
    return date.today().strftime("%d %b %Y")


def _tojson(value: Any, indent: int | None = None) -> str:
    # As Hugging Face's tojson filter: key order kept, non-ASCII as it is, ", " and ": " between items.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _split(tools: list[dict]) -> tuple[list[dict], list[str]]:
    """The custom tools, and the names of the built-in ones."""
    builtin = [t["function"]["name"] for t in tools if t["function"]["name"] in BUILTIN_TOOLS]
    return [t for t in tools if t["function"]["name"] not in BUILTIN_TOOLS], builtin


def _tools_line(builtin: list[str]) -> str:
    return ", ".join(name for name in builtin if name != "code_interpreter")


def render_call(calls: Sequence[dict], tool_format: str, builtin: Sequence[str]) -> tuple[bool, str, bool]:
    """How an assistant message's calls are written: (`<|python_tag|>` first?, the text, end with `<|eom_id|>`?).

    `builtin` names the built-in tools of the prompt. In the json format one message holds one call (Meta's
    template refuses more), ending with eom_id exactly when built-in tools are present; the code interpreter is
    written as its code, as llama-models writes it and the model emits it (the template would write
    `code_interpreter.call(code="...")`, which the model never does).
    """
    builtin_calls = [call for call in calls if call["name"] in builtin]
    if builtin_calls and len(calls) != 1:
        raise ValueError(f"a built-in tool's call ({builtin_calls[0]['name']}) must be the only call of its message")
    if builtin_calls:
        name, arguments = calls[0]["name"], calls[0]["arguments"]
        if name == "code_interpreter":
            return True, str(arguments.get("code", "")), True
        pairs = (f'{key}="{value if isinstance(value, str) else _tojson(value)}"' for key, value in arguments.items())
        return True, f"{name}.call({', '.join(pairs)})", True
    if tool_format == "pythonic":
        written = (f"{call['name']}({', '.join(f'{k}={_python(v)}' for k, v in call['arguments'].items())})"
                   for call in calls)
        return True, f"[{', '.join(written)}]", False
    if len(calls) != 1:
        raise ValueError(f"Llama 3.1's json format takes one tool call per assistant message (Meta's template "
                         f"refuses more), got {len(calls)}: give each call a message of its own")
    return False, f'{{"name": "{calls[0]["name"]}", "parameters": {_tojson(calls[0]["arguments"])}}}', bool(builtin)


def _python(value: Any) -> str:
    """`value` as a Python literal that `ast.literal_eval` reads back; strings in double quotes, as Llama 3.2's
    prompt-format document writes them."""
    if isinstance(value, str):
        return _tojson(value)
    if isinstance(value, list):
        return f"[{', '.join(map(_python, value))}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{_tojson(str(k))}: {_python(v)}' for k, v in value.items())}}}"
    return repr(value)  # int, float, bool, None


def render_dialog(dialog: Sequence["Message"], tools: list[dict], tool_format: str, date_string: str) -> Segments:
    """The prompt of `dialog` with `tools` (as `check_tools` returns them), ending with the assistant's header."""
    custom, builtin = _split(tools)
    messages = list(dialog)
    system = messages.pop(0)["content"].strip() if messages and messages[0]["role"] == "system" else ""
    if tool_format == "pythonic":
        segments = _pythonic_system(custom, builtin, system)
    else:
        segments = _json_system(builtin, system, date_string)
        if custom:
            if not messages or messages[0]["role"] != "user":
                raise ValueError("with tools in the json format the first message after the system prompt must be "
                                 "the user's: Meta's template puts the tools in it")
            segments += _json_user_tools(custom, messages.pop(0)["content"].strip())
    for message in messages:
        segments += _message(message, tool_format, builtin, tojson_results=tool_format == "json")
    return segments + [(_HEADER.format("assistant"), False)]


def _json_system(builtin: list[str], system: str, date_string: str) -> Segments:
    text = "<|begin_of_text|>" + _HEADER.format("system") + "Environment: ipython\n"
    if builtin:
        text += f"Tools: {_tools_line(builtin)}\n\n"
    text += f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n"
    return [(text, False), (system, True), ("<|eot_id|>", False)]


def _json_user_tools(custom: list[dict], first_user_message: str) -> Segments:
    segments = [(_HEADER.format("user") + _JSON_TOOLS_PREAMBLE, False)]
    for tool in custom:
        segments += [(_tojson(tool, indent=4), True), ("\n\n", False)]
    return segments + [(first_user_message, True), ("<|eot_id|>", False)]


def _pythonic_system(custom: list[dict], builtin: list[str], system: str) -> Segments:
    """llama-stack's order for Llama 3.2, one block a line apart: the built-in tools, the functions, then the
    caller's system prompt."""
    blocks: list[Segments] = []
    if builtin:
        tools_line = _tools_line(builtin)
        blocks.append([("Environment: ipython" + (f"\nTools: {tools_line}" if tools_line else ""), False)])
    if custom:
        functions = _tojson([_pythonic_function(tool) for tool in custom], indent=4)
        blocks.append([(_PYTHONIC_PREAMBLE, False), (functions, True)])
    if system:
        blocks.append([(system, True)])
    segments: Segments = [("<|begin_of_text|>" + _HEADER.format("system"), False)]
    for index, block in enumerate(blocks):
        segments += ([("\n", False)] if index else []) + block
    return segments + [("<|eot_id|>", False)]


def _pythonic_function(tool: dict) -> dict:
    """A function as Llama 3.2's prompt lists it: name, description, parameters as `{"type": "dict", "required",
    "properties"}` (the Berkeley function-calling shape the model was trained on)."""
    function = tool["function"]
    parameters = function.get("parameters", {})
    listed = {"name": function["name"]}
    if "description" in function:
        listed["description"] = function["description"]
    listed["parameters"] = {"type": "dict", "required": parameters.get("required", []),
                            "properties": parameters.get("properties", {})}
    return listed


def _message(message: "Message", tool_format: str, builtin: list[str], tojson_results: bool) -> Segments:
    role = "ipython" if message["role"] in ("tool", "ipython") else message["role"]
    if message.get("tool_calls"):
        python_tag, text, eom = render_call(message["tool_calls"], tool_format, builtin)
        return [(_HEADER.format("assistant") + ("<|python_tag|>" if python_tag else ""), False), (text, True),
                ("<|eom_id|>" if eom else "<|eot_id|>", False)]
    if role == "ipython" and tojson_results:
        # Meta's template writes a tool result through tojson: a string content becomes a JSON string.
        return [(_HEADER.format("ipython"), False), (_tojson(message["content"]), True), ("<|eot_id|>", False)]
    head = _HEADER.format(role) + ("<|python_tag|>" if message.get("python_tag") else "")
    end = "<|eom_id|>" if message.get("eom") else "<|eot_id|>"
    return [(head, False), (message["content"].strip(), True), (end, False)]
