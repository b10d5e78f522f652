"""Grammars for constrained decoding, through llguidance (the grammar engine llama.cpp, mistral.rs and vLLM use).

A grammar is llguidance's grammar text: a plain string, so that SamplingParams carrying one can be pickled and
broadcast under torchrun. The helpers below build the ones the OpenAI API needs (a JSON schema, any JSON object,
Meta's JSON tool call) and refuse what llguidance cannot compile, saying where. `GrammarVocabulary` indexes one
vocabulary for llguidance (Llama 3's tiktoken vocabulary or a GGUF one, from the bytes of its tokens), makes a
matcher per constrained sequence and computes their token masks. llguidance is imported on first use only.
"""

import functools
import json
from typing import Any

import torch

INSTALL_HINT = 'constrained decoding needs llguidance: pip install -e ".[serve]" (or pip install llguidance)'
# JSON as json.dumps(..., separators=(",", ":")) writes it, as OpenAI's structured outputs do: no whitespace at all,
# so a model cannot stall in unbounded whitespace.
COMPACT_JSON = {"whitespace_flexible": False}
# Meta's tool calls as Llama 3.1 writes them (json.dumps' default separators), still with no other whitespace.
TOOL_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
SPECIAL_TOKEN_MARKER = b"\xff"  # how llguidance tells a special token's bytes from the same text
MAX_ERROR_CHARS = 300  # llguidance's messages may dump the parser's whole state


def llguidance() -> Any:
    """The llguidance module, or ImportError saying how to install it."""
    try:
        import llguidance
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return llguidance


def _schema_error(schema: Any, options: dict) -> str:
    """llguidance's error for `schema` (with the JSON `options`), or "" when it compiles."""
    matcher = llguidance().LLMatcher
    try:
        return matcher.validate_grammar(matcher.grammar_from_json_schema(schema, overrides=options))
    except ValueError as error:  # not a JSON object
        return str(error)


def _locate(schema: Any, error: str, options: dict, pointer: str = "") -> str:
    """The JSON pointer of the deepest part of `schema` that fails alone with the same `error` ("" for the root)."""
    children = schema.items() if isinstance(schema, dict) else enumerate(schema) if isinstance(schema, list) else ()
    for key, child in children:
        path = f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}"
        if isinstance(child, (dict, list)):
            found = _locate(child, error, options, path)
            if found or (isinstance(child, dict) and _schema_error(child, options) == error):
                return found or path
    return ""


def _check_schema(schema: Any, options: dict, name: str) -> None:
    """ValueError naming the part of `schema` (called `name`) that llguidance cannot compile."""
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} is not JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{name} must be a JSON object (a JSON schema), got {type(schema).__name__}")
    error = _schema_error(schema, options)
    if error:
        where = _locate(schema, error, options)
        raise ValueError(f"{name}{' at ' + where if where else ''} cannot be compiled: {error[:MAX_ERROR_CHARS]}")


def json_schema_grammar(schema: Any, name: str = "schema") -> str:
    """Compact JSON matching the JSON schema `schema` (a dict); ValueError naming the part (as a JSON pointer
    into `schema`) that llguidance cannot compile, before any work. Object properties come in the schema's
    order; `maxLength`, `maxItems`, `enum`, `const` and numeric bounds hold (see llguidance's docs/json_schema.md
    for the supported keywords)."""
    _check_schema(schema, COMPACT_JSON, name)
    return llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON)


def response_schema(response_format: Any) -> Any:
    """The JSON schema that OpenAI's `response_format` asks for: None for {"type": "text"} (or None), any object
    for {"type": "json_object"}, the schema of {"type": "json_schema", "json_schema": {"schema": ...}}; ValueError
    naming what is wrong with another value."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    json_schema = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(json_schema, dict) or "schema" not in json_schema:
        raise ValueError('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                         f'"json_schema", "json_schema": {{"schema": ...}}}}, got {response_format!r}')
    return json_schema["schema"]


def answer_grammar(schema: Any, tools: list[dict] | None = None, python_tag: bool = False,
                   name: str = "schema") -> str:
    """Compact JSON of `schema` (called `name` in errors); with `tools`, a call of one of them may take its place
    (see `tool_call_grammar`): what a response format asks of a reply that may call tools."""
    if tools:
        return tool_call_grammar(tools, python_tag, answer_schema=schema, answer_name=name)
    return json_schema_grammar(schema, name)


def json_object_grammar() -> str:
    """Any compact JSON object: OpenAI's response_format {"type": "json_object"}."""
    return json_schema_grammar({"type": "object"})


def tool_call_grammar(tools: list[dict], python_tag: bool = False, answer_schema: Any = None,
                      answer_name: str = "schema") -> str:
    """Meta's JSON tool call of one of `tools` (OpenAI function tools, {"type": "function", "function": {"name",
    "parameters"}}): `{"name": NAME, "parameters": {...}}` with parameters matching that tool's schema (any object
    when it has none), written with json.dumps' separators as Llama 3.1 writes them. With `python_tag`, the call
    may start with <|python_tag|>, as Llama 3.1 sometimes emits (the vocabulary must have that special token).
    With `answer_schema` (called `answer_name` in errors), the reply may be compact JSON matching that schema
    instead of a call (a JSON answer, for tool_choice "auto" with a response format). ValueError naming the tool,
    or the part of a schema, that cannot be used."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of function tools")
    rules = [_call_rule(i, tool) for i, tool in enumerate(tools)]
    call = ("<|python_tag|>? " if python_tag else "") + "(" + " | ".join(f"call_{i}" for i in range(len(rules))) + ")"
    if answer_schema is not None:
        _check_schema(answer_schema, COMPACT_JSON, answer_name)
        schema = {**answer_schema, "x-guidance": COMPACT_JSON} if isinstance(answer_schema, dict) else answer_schema
        rules.append(f"answer: %json {json.dumps(schema)}")
        call = f"({call}) | answer"
    return llguidance().LLMatcher.grammar_from_lark("\n".join([f"start: {call}", *rules]))


def _call_rule(i: int, tool: Any) -> str:
    """The lark rule `call_i` of a call of `tool` (tools[i])."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
    parameters = function.get("parameters", {"type": "object"})
    _check_schema(parameters, TOOL_CALL_JSON, f"tools[{i}].function.parameters")
    head = json.dumps({"name": function["name"], "parameters": 0})[: -len("0}")]  # '{"name": "f", "parameters": '
    schema = {**parameters, "x-guidance": TOOL_CALL_JSON} if isinstance(parameters, dict) else parameters
    return f"call_{i}: {json.dumps(head)} %json {json.dumps(schema)} \"}}\""


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: every token's bytes (special tokens marked), the eos and bos ids,
    and an encoder of bytes."""

    def __init__(self, tokenizer: Any):
        special = set(tokenizer.special_tokens.values())
        self.tokens = [(SPECIAL_TOKEN_MARKER if i in special else b"") + tokenizer.model.decode_single_token_bytes(i)
                       for i in range(tokenizer.n_words)]
        self.special_token_ids = sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), bos=False, eos=False)


@functools.lru_cache(maxsize=4)
def grammar_vocabulary(tokenizer: Any) -> "GrammarVocabulary":
    """`tokenizer`'s vocabulary indexed for llguidance: built on first use (about half a second), then shared."""
    return GrammarVocabulary(tokenizer)


class GrammarVocabulary:
    """One vocabulary indexed for llguidance, whose stop tokens end a grammar: makes matchers and computes their
    masks. Works with any `llama.tokenizer.Tokenizer`, Llama 3's or a GGUF one."""

    def __init__(self, tokenizer: Any):
        ll = llguidance()
        self.n_tokens = tokenizer.n_words
        self.words = (self.n_tokens + 31) // 32  # int32 words of a mask
        self.index = ll.LLTokenizer(ll.TokenizerWrapper(_TokenizerView(tokenizer)),
                                    eos_token=sorted(tokenizer.stop_tokens))
        self._executors: dict[int | None, Any] = {}  # llguidance's thread pools, by thread count

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher of `grammar`, or ValueError saying why it cannot be used with this vocabulary."""
        if not isinstance(grammar, str):
            raise ValueError(f"grammar must be a str (llama.grammar builds them), got {type(grammar).__name__}")
        matcher = llguidance().LLMatcher(self.index, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar cannot be used: {matcher.get_error()[:MAX_ERROR_CHARS]}")
        return matcher

    def masks(self, matchers: list[Any], threads: int | None = None) -> torch.Tensor:
        """The next-token masks of `matchers`, (len, words) int32, bit j of word w allowing token 32 * w + j, computed
        across matchers on `threads` threads (None: llguidance's default, 80 % of the CPUs up to 32). Once a grammar
        is complete, or its matcher failed, only the stop tokens are allowed. llguidance releases the GIL while it
        computes, so this may run beside a forward pass."""
        if threads not in self._executors:
            self._executors[threads] = llguidance().LLExecutor(num_threads=threads)
        masks = torch.empty(len(matchers), self.words, dtype=torch.int32)
        self._executors[threads].unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], masks.data_ptr(),
                                                         self.words * 4, len(matchers))
        return masks
