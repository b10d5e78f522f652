"""OpenAI's Responses API (`POST /v1/responses`) of `python -m llama.serve`, driven by the `openai` client and the
OpenAI Agents SDK: it is the chat endpoint's reply in the Responses shapes, streamed as typed events in order, runs a
tool-calling loop with random weights (constrained decoding makes forced calls and schemas valid), and refuses what
it cannot do with a 400 naming the field."""

import asyncio
import json
import time
from typing import Annotated, Literal

import httpx
import pytest

openai = pytest.importorskip("openai")
from openai.types.responses import Response  # noqa: E402 - after the skip

MAX_SEQ_LEN = 1024
FLAGS = ["--device", "cpu", "--dtype", "float32", "--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "4"]
FORECAST = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"], "additionalProperties": False}
TOOL = {"type": "function", "name": "forecast", "description": "The weather forecast of a city", "parameters": FORECAST,
        "strict": True}
NOTE = {"type": "function", "name": "take_note",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
VERDICT = {"type": "object", "properties": {"sunny": {"type": "boolean"}, "mood": {"enum": ["calm", "windy"]}},
           "required": ["sunny", "mood"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint(1), *FLAGS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def _create(server, **body) -> dict:
    """A non-streamed response as the JSON the server sent, checked against the openai package's Response type."""
    reply = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    Response.model_validate(reply.json())
    return reply.json()


def _events(server, **body) -> list[dict]:
    """A streamed response's events, each checked: an `event:` line naming its type, then its data."""
    events = []
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True}, timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for block in reply.read().decode().split("\n\n"):
            if block:
                name, data = block.split("\n")
                events.append(json.loads(data.removeprefix("data: ")))
                assert name == f"event: {events[-1]['type']}"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _comparable(response: dict) -> dict:
    """A response without what differs between two runs of one request: ids and times."""
    fresh = {"id", "created_at", "completed_at", "call_id"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in fresh}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(response)


def _conforms_to_forecast(arguments: dict) -> bool:
    return (set(arguments) == {"city", "days"} and arguments["city"] in ["Paris", "Rome", "Oslo"]
            and type(arguments["days"]) is int and 1 <= arguments["days"] <= 7)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "name": "forecast"}, "required"],
                         ids=["named", "required"])
def test_a_forced_function_call_has_arguments_that_satisfy_the_schema(client, model, tool_choice):
    tools = [TOOL] if isinstance(tool_choice, dict) else [TOOL, NOTE]
    raw = client.responses.with_raw_response.create(model=model, input="Will it rain in Oslo this week?", tools=tools,
                                                    tool_choice=tool_choice, temperature=1.0, max_output_tokens=64)
    response = Response.model_validate(json.loads(raw.text))  # the JSON as sent, strictly
    assert response == raw.parse()
    calls = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and len(calls) == len(response.output) >= 1
    if tool_choice != "required":
        assert calls[0].name == "forecast"
    for call in calls:
        arguments = json.loads(call.arguments)
        assert _conforms_to_forecast(arguments) if call.name == "forecast" else arguments == {}
        assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    echoed = response.tool_choice if isinstance(tool_choice, str) else response.tool_choice.model_dump()
    assert echoed == tool_choice


def test_a_text_reply_is_the_chat_reply_and_stops_at_max_output_tokens(server, client, model):
    chat = client.chat.completions.create(model=model, temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    body = {"model": model, "instructions": "Be brief.", "input": "Name a colour.", "temperature": 0,
            "max_output_tokens": 12}
    response = _create(server, **body)
    assert response["id"].startswith("resp_") and response["object"] == "response"
    [message] = response["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["text"] == chat.choices[0].message.content
    if chat.choices[0].finish_reason == "length":
        assert response["status"] == "incomplete" and message["status"] == "incomplete"
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    usage = response["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert client.responses.create(**body).output_text == chat.choices[0].message.content
    # The same conversation as items, with a developer message for the instructions.
    items = [{"type": "message", "role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "input_text", "text": "Name a "},
                                          {"type": "input_text", "text": "colour."}]}]
    as_items = _create(server, **{**body, "instructions": None, "input": items})
    assert as_items["output"][0]["content"][0]["text"] == chat.choices[0].message.content


def test_a_json_schema_text_format_gives_json_that_satisfies_it(server, model):
    text_format = {"type": "json_schema", "name": "verdict", "schema": VERDICT, "strict": True}
    response = _create(server, model=model, input="Is it sunny?", text={"format": text_format},
                       max_output_tokens=48, temperature=1.0)
    assert response["status"] == "completed" and response["text"]["format"]["name"] == "verdict"
    verdict = json.loads(response["output"][0]["content"][0]["text"])
    assert set(verdict) == {"sunny", "mood"} and type(verdict["sunny"]) is bool and verdict["mood"] in ("calm", "windy")
    any_object = _create(server, model=model, input="JSON please", text={"format": {"type": "json_object"}},
                         max_output_tokens=64, temperature=0)
    if any_object["status"] == "completed":
        assert isinstance(json.loads(any_object["output"][0]["content"][0]["text"]), dict)


ORDER = {  # what each event may follow
    "response.created": {None},
    "response.in_progress": {"response.created"},
    "response.output_item.added": {"response.in_progress", "response.output_item.done"},
    "response.content_part.added": {"response.output_item.added"},
    "response.output_text.delta": {"response.content_part.added", "response.output_text.delta"},
    "response.output_text.done": {"response.output_text.delta"},
    "response.content_part.done": {"response.output_text.done"},
    "response.function_call_arguments.delta": {"response.output_item.added", "response.output_item.done"},
    "response.function_call_arguments.done": {"response.function_call_arguments.delta",
                                              "response.output_item.done"},
    "response.output_item.done": {"response.content_part.done", "response.function_call_arguments.done"},
    "response.completed": {"response.output_item.done"},
    "response.incomplete": {"response.output_item.done"},
}


@pytest.mark.parametrize("request_body", [
    {"input": "Tell me a story.", "max_output_tokens": 10},
    {"input": "Is it sunny?", "text": {"format": {"type": "json_schema", "name": "v", "schema": VERDICT}}},
    {"input": "Weather in Rome?", "tools": [TOOL], "tool_choice": "required", "max_output_tokens": 64},
], ids=["text", "json_schema", "function_call"])
def test_streamed_events_come_in_order_and_end_in_the_unstreamed_response(server, client, model, request_body):
    body = {"model": model, "temperature": 0, **request_body}
    events = _events(server, **body)
    previous = None
    for event in events:
        assert previous in ORDER[event["type"]], f"{event['type']} after {previous}"
        previous = event["type"]
    final = events[-1]["response"]
    assert events[-1]["type"] == f"response.{final['status']}" and Response.model_validate(final)
    assert _comparable(final) == _comparable(_create(server, **body))
    for item in final["output"]:  # the deltas add up to the items
        if item["type"] == "message":
            deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
            assert "".join(deltas) == item["content"][0]["text"]
        else:
            deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
            assert "".join(deltas) == item["arguments"]
    stream = client.responses.create(**body, stream=True)  # the openai client parses every event
    assert [event.type for event in stream] == [event["type"] for event in events]
    if final["status"] == "completed":  # the client's helper checks the events against its snapshot
        with client.responses.stream(**body) as helper:
            done = helper.get_final_response()
        assert done.output_text == Response.model_validate(final).output_text
        arguments = [item.get("arguments") for item in final["output"]]
        assert [getattr(item, "arguments", None) for item in done.output] == arguments


def test_a_tool_loop_sends_the_call_and_its_output_back(server, client, model):
    first = client.responses.create(model=model, input="Forecast for Paris?", tools=[TOOL],
                                    tool_choice={"type": "function", "name": "forecast"}, max_output_tokens=64)
    [call] = first.output
    arguments = json.loads(call.arguments)
    assert _conforms_to_forecast(arguments)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"rain_mm": 3})}
    items = [{"role": "user", "content": "Forecast for Paris?"}, call.model_dump(exclude_none=True), result]
    second = _create(server, model=model, input=items, tools=[TOOL], temperature=0, max_output_tokens=8)
    assert second["output"][0]["type"] == "message"
    # The server saw the chat conversation these items stand for: the same prompt and the same greedy reply.
    chat = client.chat.completions.create(model=model, temperature=0, max_tokens=8, tools=[
        {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}], messages=[
        {"role": "user", "content": "Forecast for Paris?"},
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                              "function": {"name": "forecast", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result["output"]}])
    assert second["usage"]["input_tokens"] == chat.usage.prompt_tokens
    assert second["output"][0]["content"][0]["text"] == (chat.choices[0].message.content or "")


def test_logprobs_are_included_when_asked(server, client, model):
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                          max_tokens=4, logprobs=True, top_logprobs=2)
    response = _create(server, model=model, input="Hi", temperature=0, max_output_tokens=4, top_logprobs=2,
                       include=["message.output_text.logprobs"])
    logprobs = response["output"][0]["content"][0]["logprobs"]
    assert [entry["token"] for entry in logprobs] == [entry.token for entry in chat.choices[0].logprobs.content]
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    assert _create(server, model=model, input="Hi", max_output_tokens=2)["output"][0]["content"][0]["logprobs"] == []


def test_the_agents_sdk_runs_a_tool_calling_agent(server, model):
    agents = pytest.importorskip("agents")
    from pydantic import BaseModel, Field

    agents.set_tracing_disabled(True)
    calls, runs = [], [1]  # the calls made, and the runs started

    # One call per run: after it the tool is withdrawn, so the next turn (tool_choice "auto" and the output type's
    # schema, which would let a random model call again and again) can only be the answer.
    @agents.function_tool(is_enabled=lambda context, agent: len(calls) < runs[0])
    def forecast(city: Literal["Paris", "Rome", "Oslo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """The weather forecast of a city for a number of days."""
        calls.append((city, days))
        return f"Sunny in {city} for {days} days"

    class Verdict(BaseModel):
        sunny: bool

    def agent():  # with a client of its own: an async client stays with the event loop it first ran in
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0, timeout=120)
        return agents.Agent(name="weather", instructions="Use the tool, then answer.", tools=[forecast],
                            output_type=Verdict, model=agents.OpenAIResponsesModel(model=model, openai_client=client),
                            model_settings=agents.ModelSettings(tool_choice="required", max_tokens=48))

    # The first turn must call the tool; the SDK then sends its output back, and the model answers.
    result = agents.Runner.run_sync(agent(), "Is it sunny in Paris this week?")
    assert len(calls) == 1 and calls[0][0] in ("Paris", "Rome", "Oslo") and 1 <= calls[0][1] <= 7
    assert isinstance(result.final_output, Verdict)
    runs[0] = 2

    async def streamed():
        run = agents.Runner.run_streamed(agent(), "And in Rome?")
        async for _ in run.stream_events():
            pass
        return run.final_output

    assert isinstance(asyncio.run(streamed()), Verdict) and len(calls) == 2


def test_a_dropped_stream_frees_its_slot(server, model):
    body = {"model": model, "input": "Once", "max_output_tokens": MAX_SEQ_LEN - 16, "temperature": 1.0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as reply:
        next(reply.iter_lines())
    deadline = time.monotonic() + 10  # cancelled: sampled to the end, it would take far longer
    while httpx.get(f"{server.url}/health").json()["sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").json()["sequences"] == 0


def test_fields_that_only_label_a_request_are_accepted(server, model):
    response = _create(server, model=model, input="Hi", max_output_tokens=2, user="me", metadata={"k": "v"},
                       store=True, service_tier="auto", safety_identifier="s", prompt_cache_key="p",
                       prompt_cache_retention="24h", include=["reasoning.encrypted_content"], truncation="disabled",
                       reasoning={"effort": None}, background=False, stream_options={"include_obfuscation": False},
                       max_tool_calls=3, parallel_tool_calls=False)
    assert response["metadata"] == {"k": "v"} and response["parallel_tool_calls"] is False


CALL = {"type": "function_call", "call_id": "call_1", "name": "forecast", "arguments": '{"city": "Rome", "days": 2}'}
BAD = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no state"),
    ({"conversation": "conv_1"}, "conversation", "keeps no state"),
    ({"background": True}, "background", "foreground"),
    ({"truncation": "auto"}, "truncation", "auto"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort", "reason"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "max_output_tokens"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "templates"),
    ({"top_k": 4}, "top_k", "unrecognized field"),
    ({"tools": [{"type": "web_search"}]}, "tools.0", "'web_search'"),
    ({"tools": [TOOL, TOOL]}, "tools", "given twice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice", "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type", "'web_search_preview'"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"when": {"type": "string", "format": "moon"}}}}}}, "text.format.schema",
     "cannot be compiled"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", ""),
    ({"temperature": 3}, "temperature", ""),
    ({"max_output_tokens": 0}, "max_output_tokens", ""),
    ({"top_logprobs": 21}, "top_logprobs", ""),
    ({"input": []}, "input", ""),
    ({"input": 3}, "input", "string or a list"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "keeps no state"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input.0", "'reasoning'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.message.content.0", "'input_image'"),
    ({"input": [{"role": "robot", "content": "Hi"}]}, "input.0.message.role", ""),
    ({"input": [CALL, {"type": "function_call_output", "call_id": "call_2", "output": "4"}]}, "input.1.call_id",
     "answers no function_call"),
    ({"input": [{**CALL, "arguments": "[1]"}]}, "input.0.arguments", "JSON object"),
    ({"input": "word " * MAX_SEQ_LEN}, "input", f"fit in max_seq_len={MAX_SEQ_LEN}"),
]


@pytest.mark.parametrize("fields, param, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_400_naming_the_field(server, fields, param, words):
    reply = httpx.post(f"{server.url}/v1/responses", json={"input": "Hi", **fields}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_an_unknown_model_is_404(server):
    reply = httpx.post(f"{server.url}/v1/responses", json={"input": "Hi", "model": "gpt-5"}, timeout=60)
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
