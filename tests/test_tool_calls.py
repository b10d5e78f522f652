"""Tool calls parsed from replies: llama-models' parser (`ChatFormat.decode_assistant_message_from_content`, with
`tool_utils.py`) is the reference, on the replies of its prompt-format documents and on cases of our own; where the
two differ on purpose, a test says how. Then the library: chat_completion and stream_chat return the calls."""

import re
from pathlib import Path

import pytest

from llama.tool_calls import parse_tool_calls
from tool_examples import GET_WEATHER, SEARCH, WEATHER

STOP = re.compile(r"(<\|eot_id\|>|<\|eom_id\|>)$")


@pytest.fixture(scope="module")
def meta_parser(meta_tokenizer):
    """`meta_parser(text)`: the (name, arguments) pairs llama-models reads from a reply as the model wrote it."""
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat

    meta = MetaChatFormat(meta_tokenizer)

    def parse(text: str) -> list[tuple[str, dict]]:
        message = meta.decode_assistant_message_from_content(text, StopReason.end_of_turn)
        return [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in message.tool_calls]

    return parse


def ours(text: str) -> list[tuple[str, dict]]:
    """Our (name, arguments) pairs for a reply as the model wrote it (the library gets it without its stop token)."""
    calls = parse_tool_calls(STOP.sub("", text))
    assert len({call["id"] for call in calls}) == len(calls) and all(c["id"].startswith("call_") for c in calls)
    return [(call["name"], call["arguments"]) for call in calls]


def documented_replies() -> list[str]:
    import llama_models

    root = Path(llama_models.__file__).parent
    texts = [(root / f).read_text() for f in ("llama3_1/prompt_format.md", "llama3_2/text_prompt_format.md")]
    return [r for text in texts for r in re.findall(r"##### Model Response Format\n```\n(.*?)\n```", text, re.S)]


def test_the_documents_hold_every_reply_shape():
    replies = documented_replies()
    assert len(replies) == 13
    assert {name for reply in replies for name, _ in ours(reply)} == {
        "brave_search", "code_interpreter", "trending_songs", "get_weather", "get_user_info"}


@pytest.mark.parametrize("reply", documented_replies(), ids=lambda r: r[:40])
def test_the_documented_replies_parse_as_llama_models_parses_them(meta_parser, reply):
    expected = meta_parser(reply)
    if reply.startswith("[get_weather(") and len(ours(reply)) == 2:
        expected.append(("get_weather", {"city": "Seattle", "metric": "celsius"}))  # llama-models keeps the first
    assert ours(reply) == expected


OWN_CASES = [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2], "exact": true}}<|eom_id|>',
    '{"type": "function", "name": "translate", "parameters": {"text": "héllo ✓", "to": "日本語"}}',
    '<function=get_weather>{"city": "Paris"}</function>',
    '<function=getWeather>{"location":"New York","date":"2023-08-05"}',
    "<function=get_weather>{'city': 'Paris'}</function>",
    '[get_boiling_point(liquid_name="water", celcius=True)]',
    "[initialize()]",
    "<|python_tag|>[calculate_volume(radius=5.2, height=10)]",
    '[get_boiling_point(liquid={"name": "water", "color": "translucent"})]',
    'brave_search.call(query="weather in Menlo Park")',
    '<|python_tag|>wolfram_alpha.call(query="solve x^2 + 2x = 8")<|eom_id|>',
    "<|python_tag|>print(2 + 2)<|eom_id|>",
    "<|python_tag|>import math\nprint(math.pi)",
    "Hello! How can I help you today?",
    "[1, 2, 3]",
    '{"a": 1, "b": [true, null]}',
    "The call is [ and nothing more",
    '{"name": "get_weather"',
]


@pytest.mark.parametrize("reply", OWN_CASES)
def test_our_cases_parse_as_llama_models_parses_them(meta_parser, reply):
    assert ours(reply) == meta_parser(reply)


def test_where_we_part_from_llama_models_on_purpose(meta_parser):
    # Every call of a pythonic list, not only the first (llama-models: "FIXME: Enable multiple tool calls").
    both = '[get_weather(city="SF"), get_time(zone="PST")]'
    assert ours(both) == [("get_weather", {"city": "SF"}), ("get_time", {"zone": "PST"})]
    assert meta_parser(both) == ours(both)[:1]
    # OpenAI's "arguments" instead of "parameters" (llama-models raises KeyError); also as a JSON string.
    arguments = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert ours(arguments) == ours('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}') == [
        ("get_weather", {"city": "Paris"})]
    with pytest.raises(KeyError):
        meta_parser(arguments)
    # Nested objects in a <function> tag (llama-models' non-greedy regex cuts the JSON at the first "}").
    nested = '<function=book>{"guest": {"name": "Ada"}, "nights": 2}</function>'
    assert ours(nested) == [("book", {"guest": {"name": "Ada"}, "nights": 2})] and meta_parser(nested) == []
    # A sentence that quotes a built-in call is an answer, not a call (llama-models finds the pattern anywhere).
    quoted = 'I would run brave_search.call(query="gold") for that.'
    assert ours(quoted) == [] and meta_parser(quoted) == [("brave_search", {"query": "gold"})]
    # A list whose arguments are not literals is text (llama-models raises ValueError).
    assert ours("[get_weather(city=Paris)]") == []
    with pytest.raises(ValueError):
        meta_parser("[get_weather(city=Paris)]")
    # A JSON call to a built-in keeps its arguments (llama-models renames the first one "query").
    code = '{"name": "code_interpreter", "parameters": {"code": "print(1)"}}'
    assert ours(code) == [("code_interpreter", {"code": "print(1)"})]
    assert meta_parser(code) == [("code_interpreter", {"query": "print(1)"})]


@pytest.mark.parametrize("tool_format, tools", [("json", [WEATHER]), ("pythonic", [GET_WEATHER]),
                                                ("json", [SEARCH, WEATHER])])
def test_a_call_rendered_into_a_prompt_parses_back(chat_format, tokenizer, tool_format, tools):
    name = tools[0]["function"]["name"]
    arguments = {"query": "gold"} if name == "brave_search" else {"city": "Saint-Étienne", "days": 3}
    dialog = [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": name, "arguments": arguments}]}]
    text = tokenizer.decode(chat_format.encode_dialog_prompt(dialog, tools, tool_format))
    written = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[-2]
    assert [(c["name"], c["arguments"]) for c in parse_tool_calls(STOP.sub("", written))] == [(name, arguments)]
