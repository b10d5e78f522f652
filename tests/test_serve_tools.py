"""Tools and structured outputs over HTTP, driven by real clients (the `openai` package and `langchain-openai`).

The model is the tiny random-weight checkpoint, so its free text means nothing: every reply checked here is one
that only constrained decoding can produce (a forced tool call whose arguments satisfy the tool's schema, JSON that
satisfies a response_format), or one whose shape the request fixes (n choices, a logit_bias that forces a token).
"""

import json
from typing import Literal

import httpx
import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["zone"],
        "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    population: int = pydantic.Field(ge=0, le=10**8)
    coastal: bool
    region: Literal["north", "south"]


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint(1), "--device", "cpu", "--dtype", "float32", "--max_seq_len", "1024",
                        "--max_batch_size", "4")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def check_weather_arguments(arguments: str) -> None:
    values = json.loads(arguments)
    assert set(values) == {"city", "unit"} and values["unit"] in ("celsius", "fahrenheit")
    assert isinstance(values["city"], str) and len(values["city"]) <= 12
    assert arguments == json.dumps(values, ensure_ascii=False)  # no whitespace but json.dumps' own


def test_a_named_tool_choice_returns_a_call_whose_arguments_fit_the_schema(client, model):
    reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    check_weather_arguments(call.function.arguments)


def test_a_streamed_call_comes_as_openais_tool_call_deltas(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200, stream=True))
    deltas = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    assert deltas and deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(delta.index == 0 for delta in deltas)
    check_weather_arguments("".join(delta.function.arguments or "" for delta in deltas))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the call is not content


def test_required_picks_one_of_the_tools_and_the_result_goes_back(client, model):
    reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=3)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    conversation = [*ASK, reply.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model=model, messages=conversation, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=5)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"


def test_parse_with_a_pydantic_model_gives_an_instance(client, model):
    reply = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "A city?"}],
                                          response_format=City, max_tokens=200)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == city.model_dump_json()  # compact JSON


def test_json_object_gives_an_object_and_a_short_budget_ends_with_length(client, model):
    # Any object: nothing bounds a random model's strings, so it may run out of tokens inside one.
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}],
                                           response_format={"type": "json_object"}, max_tokens=300, seed=1,
                                           temperature=1.0)
    content, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert isinstance(json.loads(content), dict) if reason == "stop" else content.startswith("{")
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}}
    cut = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A city?"}],
                                         response_format=schema, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


def test_n_choices_and_logit_bias(client, model, server):
    reply = client.chat.completions.create(model=model, messages=ASK, n=3, max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1  # greedy: three times the same
    assert reply.usage.completion_tokens == 12
    token = httpx.post(f"{server.url}/tokenize", json={"prompt": " yes", "add_special_tokens": False}).json()
    forced = client.chat.completions.create(model=model, messages=ASK, max_tokens=3, temperature=0,
                                            logit_bias={str(token["tokens"][0]): 100})
    assert forced.choices[0].message.content == " yes" * 3


def test_langchain_binds_tools_and_asks_for_structured_output(server, model):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model=model, max_tokens=200,
                                       max_retries=0, timeout=120)
    message = chat.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    check_weather_arguments(json.dumps(call["args"], ensure_ascii=False))
    city = chat.with_structured_output(City, method="json_schema").invoke("A city?")
    assert isinstance(city, City)
    forced = chat.with_structured_output(City, method="function_calling").invoke("A city?")
    assert isinstance(forced, City)


def test_under_torchrun_two_processes_give_the_one_process_calls_and_json(start_server, tiny_checkpoint, client,
                                                                            model):
    """Rank 0 holds the grammars and picks the tokens; rank 1 computes with it. Greedy: the same replies."""
    two = start_server(tiny_checkpoint(2), "--device", "cpu", "--dtype", "float32", "--max_seq_len", "1024",
                       "--max_batch_size", "4", "--model_name", model, nproc=2)
    other = openai.OpenAI(base_url=f"{two.url}/v1", api_key="none", max_retries=0, timeout=120)
    for stream in (False, True):
        for request in ({"tools": [WEATHER, TIME], "tool_choice": "required"},
                        {"response_format": {"type": "json_schema", "json_schema": {
                            "name": "city", "schema": {**City.model_json_schema(), "additionalProperties": False}}}}):
            replies = []
            for each in (client, other):
                reply = each.chat.completions.create(model=model, messages=ASK, max_tokens=200, temperature=0,
                                                     stream=stream, **request)
                if stream:
                    chunks = [c.choices[0].delta for c in reply if c.choices]
                    calls = [(d.function.name, d.function.arguments) for c in chunks for d in c.tool_calls or []]
                    replies.append(("".join(c.content or "" for c in chunks), calls))
                else:
                    message = reply.choices[0].message
                    replies.append((message.content, [(c.function.name, c.function.arguments)
                                                      for c in message.tool_calls or []]))
            assert replies[0] == replies[1] and (replies[0][1] or City.model_validate_json(replies[0][0]))
    tool = {"type": "function", **WEATHER["function"]}  # the Responses API's flat function tool
    calls = [each.responses.create(model=model, input="Weather in Paris?", tools=[tool], tool_choice="required",
                                   temperature=0, max_output_tokens=200).output[0] for each in (client, other)]
    assert (calls[0].name, calls[0].arguments) == (calls[1].name, calls[1].arguments)
    check_weather_arguments(calls[0].arguments)


def test_auto_with_a_response_format_is_a_call_or_the_json_and_a_forced_call_wins(client, model):
    """tool_choice "auto" with a schema: the reply is a call of a tool or JSON of the schema, nothing else; a call
    that tool_choice forces follows the tool's schema, whatever the response format (as the Responses API does)."""
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        **City.model_json_schema(), "additionalProperties": False}}}
    for seed in range(4):
        reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], response_format=schema,
                                               max_tokens=200, temperature=1.0, seed=seed)
        message = reply.choices[0].message
        if message.tool_calls:
            check_weather_arguments(message.tool_calls[0].function.arguments)
        else:
            City.model_validate_json(message.content)
    forced = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], response_format=schema,
                                            tool_choice="required", max_tokens=200)
    check_weather_arguments(forced.choices[0].message.tool_calls[0].function.arguments)
