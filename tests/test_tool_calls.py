"""Tool calls parsed from replies: llama-models' parser (`ChatFormat.decode_assistant_message_from_content`, with
`tool_utils.py`) is the reference, on the replies of its prompt-format documents and on cases of our own; where the
two differ on purpose, a test says how. Then the library: chat_completion and stream_chat return the calls."""

import re
from pathlib import Path

import pytest

from llama import Llama
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
    prefixed = 'Sure: <function=get_weather>{"city": "Paris"}</function>'
    assert ours(prefixed) == [] and meta_parser(prefixed) == [("get_weather", {"city": "Paris"})]
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


# The library


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=1024, max_batch_size=2)


DIALOG = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the weather in Paris?"}]


def force_reply(llama: Llama, force_tokens, text: str, python_tag: bool = False, eom: bool = False):
    tokenizer = llama.tokenizer
    forced = [tokenizer.python_tag_id] * python_tag + tokenizer.encode(text, bos=False, eos=False)
    force_tokens(llama, forced + [tokenizer.eom_id if eom else tokenizer.eot_id])


def test_chat_completion_returns_the_calls_and_takes_them_back(llama, force_tokens):
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    force_reply(llama, force_tokens, call)
    reply = llama.chat_completion([DIALOG], temperature=0, max_gen_len=40, tools=[WEATHER])[0]["generation"]
    [tool_call] = reply.pop("tool_calls")
    assert reply == {"role": "assistant", "content": ""}
    assert tool_call["name"] == "get_weather" and tool_call["arguments"] == {"city": "Paris"}
    assert tool_call["id"].startswith("call_")
    # The reply and the tool's result go back into the dialog; the call is written as the model wrote it.
    dialog = [*DIALOG, {**reply, "tool_calls": [tool_call]},
              {"role": "tool", "content": "21 C", "tool_call_id": tool_call["id"]}]
    prompt = llama.tokenizer.decode(llama.formatter.encode_dialog_prompt(dialog, [WEATHER]))
    assert f"<|end_header_id|>\n\n{call}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"21 C\"" in prompt
    # Without tools nothing is parsed: the reply is the text, as before.
    force_reply(llama, force_tokens, call)
    plain = llama.chat_completion([DIALOG], temperature=0, max_gen_len=40)[0]["generation"]
    assert plain == {"role": "assistant", "content": call}


def test_a_builtin_call_keeps_its_flags_and_a_pythonic_reply_gives_every_call(llama, force_tokens):
    force_reply(llama, force_tokens, 'brave_search.call(query="gold price")', python_tag=True, eom=True)
    reply = llama.chat_completion([DIALOG], temperature=0, max_gen_len=40, tools=[SEARCH])[0]["generation"]
    assert reply["python_tag"] is True and reply["eom"] is True and reply["content"] == ""
    assert [(c["name"], c["arguments"]) for c in reply["tool_calls"]] == [("brave_search", {"query": "gold price"})]
    force_reply(llama, force_tokens, '[get_weather(city="Paris"), get_weather(city="Lyon")]')
    reply = llama.chat_completion([DIALOG], temperature=0, max_gen_len=40, tools=[GET_WEATHER],
                                  tool_format="pythonic")[0]["generation"]
    assert [c["arguments"]["city"] for c in reply["tool_calls"]] == ["Paris", "Lyon"]


def test_a_streamed_call_gives_its_text_and_then_its_calls(llama, force_tokens):
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    force_reply(llama, force_tokens, call)
    stream = llama.stream_chat(DIALOG, temperature=0, max_gen_len=40, tools=[WEATHER], date_string="21 Sep 2024")
    assert stream.tool_calls is None and stream.message is None  # not before the end
    assert "".join(stream) == call
    assert [(c["name"], c["arguments"]) for c in stream.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert stream.message["tool_calls"] == stream.tool_calls and stream.message["content"] == ""
    force_reply(llama, force_tokens, "Sunny.")
    answer = llama.stream_chat(DIALOG, temperature=0, max_gen_len=40, tools=[WEATHER])
    assert "".join(answer) == "Sunny." and answer.tool_calls == [] and answer.message == {
        "role": "assistant", "content": "Sunny."}


def test_the_prompt_offers_the_tools_in_the_format_of_the_checkpoints_shape(llama):
    stream = llama.stream_chat(DIALOG, max_gen_len=1, tools=[WEATHER], date_string="21 Sep 2024")
    assert stream.prompt_tokens == llama.formatter.encode_dialog_prompt(DIALOG, [WEATHER], "json", "21 Sep 2024")
    stream.close()  # the tiny preset is no Llama 3.2 1B/3B: json, as tool_format="json" gives
    pythonic = llama.stream_chat(DIALOG, max_gen_len=1, tools=[WEATHER], tool_format="pythonic")
    assert pythonic.prompt_tokens == llama.formatter.encode_dialog_prompt(DIALOG, [WEATHER], "pythonic")
    pythonic.close()


def test_bad_tool_arguments_fail_at_the_call(llama):
    with pytest.raises(ValueError, match=r"tools\[0\] needs a 'name'"):
        llama.chat_completion([DIALOG], tools=[{"description": "x"}])
    with pytest.raises(ValueError, match="tool_format must be one of json, pythonic"):
        llama.stream_chat(DIALOG, tools=[WEATHER], tool_format="xml")
    with pytest.raises(ValueError, match="date_string must be a str"):
        llama.chat_completion([DIALOG], tools=[WEATHER], date_string=20240921)


def test_readme_tool_call_example_runs_and_prints_the_call(llama, force_tokens, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme.split("### Tool calls", 1)[1], flags=re.S)[0]
    call = llama.tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}', bos=False, eos=False)
    answer = llama.tokenizer.encode("It is 21 degrees.", bos=False, eos=False)
    eot = llama.tokenizer.eot_id
    # The call, its stop token, then the answer from the second prompt's prefill on.
    force_tokens(llama, [*call, eot, *answer, eot])
    monkeypatch.setattr(Llama, "build", staticmethod(lambda *args, **kwargs: llama))
    exec(example, {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[\{'id': 'call_\w{24}', 'name': 'get_weather', 'arguments': \{'city': 'Paris'\}\}\]",
                        printed[0])
    assert printed[1:] == ["It is 21 degrees."]
