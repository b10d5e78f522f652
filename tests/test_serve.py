"""`python -m llama.serve`, run as a real server process and driven with the official `openai` client and raw HTTP:
its replies are the library's, requests do not disturb each other, and every failure is an OpenAI-shaped error."""

import http.client
import importlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

MAX_SEQ_LEN, MAX_BATCH = 256, 4
BASE_FLAGS = ["--device", "cpu", "--dtype", "float32"]
FLAGS = [*BASE_FLAGS, "--max_seq_len", str(MAX_SEQ_LEN)]
DIALOGS = [
    [{"role": "user", "content": "Name three uses of a paperclip."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "What is 2 + 2? Use Python."}, {"role": "assistant", "content": "print(2 + 2)"},
     {"role": "tool", "content": "4"}],
]


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint(1), *FLAGS, "--max_batch_size", str(MAX_BATCH))


@pytest.fixture(scope="module")
def strict_server(start_server, tiny_checkpoint):
    """One slot, no queue, an API key, and room for a reply long enough to still run while the test looks."""
    return start_server(tiny_checkpoint(1), *BASE_FLAGS, "--max_seq_len", "4096", "--max_batch_size", "1",
                        "--max_queue", "0", "--api_key", "secret", "--model_name", "strict")


@pytest.fixture(scope="module")
def library(build_tiny):
    return build_tiny(max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0, timeout=60)


def _model(server) -> str:
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def _stream_chat(client, model, **kwargs) -> tuple[str, str, list]:
    text, reasons, chunks = [], [], list(client.chat.completions.create(model=model, stream=True, **kwargs))
    for chunk in chunks:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    return "".join(text), [r for r in reasons if r][-1], chunks


def test_health_and_the_model_named_after_the_checkpoint_folder(server, client, tiny_checkpoint):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [tiny_checkpoint(1).name]


@pytest.mark.parametrize("dialog", DIALOGS, ids=["user", "conversation", "tool"])
def test_greedy_chat_is_the_librarys_reply_streamed_or_not(server, client, library, dialog):
    expected = library.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    model = _model(server)
    reply = client.chat.completions.create(model=model, messages=dialog, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    prompt_len = len(library.formatter.encode_dialog_prompt(dialog))
    assert reply.usage.prompt_tokens == prompt_len and reply.usage.total_tokens == prompt_len + reply.usage.completion_tokens
    text, reason, chunks = _stream_chat(client, model, messages=dialog, temperature=0, max_completion_tokens=24,
                                        stream_options={"include_usage": True})
    assert text == expected and reason == reply.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_chat_logprobs_are_the_librarys_and_text_parts_join(server, client, library):
    expected = library.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=8, logprobs=True)[0]
    parts = [{"type": "text", "text": "Name three uses"}, {"type": "text", "text": " of a paperclip."}]
    reply = client.chat.completions.create(model=_model(server), messages=[{"role": "user", "content": parts}],
                                           temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == expected["generation"]["content"]
    assert [e.token for e in choice.logprobs.content] == expected["tokens"]
    assert torch.allclose(torch.tensor([e.logprob for e in choice.logprobs.content]),
                          torch.tensor(expected["logprobs"]), atol=1e-4)
    for entry in choice.logprobs.content:  # greedy: the token picked is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token


def test_greedy_completions_are_the_librarys_one_choice_per_prompt(server, client, library, prompts):
    expected = [p["generation"] for p in library.text_completion(prompts, temperature=0, max_gen_len=20)]
    reply = client.completions.create(model=_model(server), prompt=prompts, temperature=0, max_tokens=20)
    assert [c.index for c in reply.choices] == list(range(len(prompts)))
    assert [c.text for c in reply.choices] == expected
    texts = [""] * len(prompts)
    for chunk in client.completions.create(model=_model(server), prompt=prompts, temperature=0, max_tokens=20,
                                           stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == expected
    echoed = client.completions.create(model=_model(server), prompt=prompts[0], temperature=0, max_tokens=20, echo=True)
    assert echoed.choices[0].text == prompts[0] + expected[0]


def test_concurrent_clients_each_get_their_solo_result(server, client, library, prompts):
    jobs = [(p, n) for p in prompts for n in (5, 30)]
    expected = [library.text_completion([p], temperature=0, max_gen_len=n)[0]["generation"] for p, n in jobs]
    results = [None] * len(jobs)

    def ask(i: int) -> None:
        prompt, n = jobs[i]
        stream = client.completions.create(model=_model(server), prompt=prompt, temperature=0, max_tokens=n,
                                           stream=i % 2 == 0)
        results[i] = "".join(c.choices[0].text for c in stream if c.choices) if i % 2 == 0 else stream.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == expected


def test_a_short_request_started_while_a_long_one_runs_finishes_first(server, client):
    model, finished, reasons = _model(server), {}, []
    started = threading.Event()

    def long_request() -> None:  # read as it arrives, so its end is timed when the server sends it
        for chunk in client.completions.create(model=model, prompt="Once upon a time", temperature=0,
                                               max_tokens=MAX_SEQ_LEN - 10, stream=True):
            started.set()
            reasons.extend(c.finish_reason for c in chunk.choices)
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(60)
    short = client.completions.create(model=model, prompt="Hi", temperature=0, max_tokens=2)
    finished["short"] = time.monotonic()
    thread.join(120)
    assert [r for r in reasons if r] == ["length"] and short.choices[0].finish_reason == "length"
    assert finished["short"] < finished["long"]


def test_echo_logprobs_of_token_id_prompts_are_the_librarys(server, library, tokenizer):
    prompts = [tokenizer.encode("The capital of France is", bos=True, eos=False), [9906, 1917, 11, 358]]
    tokens, logprobs = library.generate(prompts, max_gen_len=1, temperature=0, logprobs=True, echo=True)
    for max_tokens in (1, 0):
        body = {"model": _model(server), "prompt": prompts, "max_tokens": max_tokens, "echo": True, "logprobs": 5,
                "temperature": 0}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert _streamed_logprobs(server, body, len(prompts)) == [c["logprobs"] for c in reply["choices"]]
        for i, choice in enumerate(reply["choices"]):
            expected = tokens[i][: len(prompts[i]) + max_tokens]
            got = choice["logprobs"]
            assert got["tokens"] == [tokenizer.decode([t]) for t in expected]
            assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
            assert torch.allclose(torch.tensor(got["token_logprobs"][1:]),
                                  torch.tensor(logprobs[i][1 : len(expected)]), atol=1e-4)
            for value, top in zip(got["token_logprobs"][1:], got["top_logprobs"][1:]):
                assert len(top) <= 5 and max(top.values()) >= value - 1e-6  # lm-eval's greedy check
            offsets = [0]
            for piece in got["tokens"][:-1]:
                offsets.append(offsets[-1] + len(piece))
            assert got["text_offset"] == offsets
        assert reply["usage"]["prompt_tokens"] == sum(map(len, prompts))


def _streamed_logprobs(server, body: dict, n: int) -> list[dict]:
    """The logprobs of each choice of `body` streamed, its chunks' lists joined."""
    joined = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(n)]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: "):])["choices"]:
                    for key, values in (choice["logprobs"] or {}).items():
                        joined[choice["index"]][key] += values
    return joined


def test_tokenizer_endpoints_round_trip(server, tokenizer):
    text = "Hello, world! <|eot_id|> 🦙"
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == tokenizer.encode(text, bos=True, eos=False, allowed_special="all")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_SEQ_LEN
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": "<|begin_of_text|>" + text}
    special = httpx.post(f"{server.url}/tokenize", json={"prompt": "<|begin_of_text|>", "add_special_tokens": False})
    assert special.json()["tokens"] == [128000]
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["bos_token"] == "<|begin_of_text|>" and info["eos_token"] == "<|end_of_text|>"
    assert "chat_template" not in info  # Llama 3's format is built in, not a template


def test_a_stop_string_ends_the_reply_before_it(server, client, library):
    full = library.chat_completion([DIALOGS[0]], temperature=0, max_gen_len=40)[0]["generation"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    model = _model(server)
    reply = client.chat.completions.create(model=model, messages=DIALOGS[0], temperature=0, max_tokens=40,
                                           stop=[stop, "never to be seen"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    text, reason, _ = _stream_chat(client, model, messages=DIALOGS[0], temperature=0, max_tokens=40, stop=stop)
    assert (text, reason) == (expected, "stop")


def test_a_seed_repeats_a_sampled_reply(server, client):
    def ask() -> str:
        return client.completions.create(model=_model(server), prompt="Hello", max_tokens=12, temperature=1.0,
                                         seed=1234).choices[0].text

    assert ask() == ask()


def _wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/health").json()["sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").json()["sequences"] == 0


def test_a_dropped_stream_frees_its_slot(server, client):
    body = {"model": _model(server), "prompt": "Once", "max_tokens": MAX_SEQ_LEN - 8, "stream": True,
            "temperature": 1.0}
    for _ in range(MAX_BATCH):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            next(response.iter_lines())
    _wait_idle(server, timeout=5)  # cancelled: sampled to the end, they would take far longer
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(
        client.completions.create(model=_model(server), prompt="Hi", max_tokens=3))) for _ in range(MAX_BATCH)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == MAX_BATCH


def _assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"]
    return error


LONG_PROMPT = "word" + " word" * (MAX_SEQ_LEN - 1)  # with BOS: one token more than fits
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", {"max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "Hi"}]}, "role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "content"),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": [128256]}, "prompt"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, f"has {MAX_SEQ_LEN + 1} tokens"),
    ("/detokenize", {"tokens": [10**7]}, "token ids"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort is not supported"),
    ("/v1/chat/completions", {**CHAT, "top_k": 5}, "unrecognized field 'top_k'"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"hello": 3}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]}, "JSON-schema object"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}] * 2},
     "given twice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not in tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "has no tools"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"when": {"type": "string", "format": "moon"}}}}}},
     "/properties/when cannot be compiled"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "3"}]}, "answers no tool call"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, "suffix is not supported"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
]


@pytest.mark.parametrize("path, body, words", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_invalid_requests_are_400_in_openais_shape(server, path, body, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = _assert_error(httpx.post(f"{server.url}{path}", content=content, timeout=60), 400, words)
    assert error["type"] == "invalid_request_error"


def test_too_long_a_prompt_says_its_length_and_the_limit(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": LONG_PROMPT})
    error = _assert_error(response, 400, str(MAX_SEQ_LEN + 1), str(MAX_SEQ_LEN))
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"


def test_label_fields_are_ignored_and_an_empty_bearer_is_accepted(server):
    body = {**CHAT, "user": "me", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
            "messages": [{"role": "user", "content": "Hi", "x": 1}]}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # httpx refuses "Bearer "
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer "})
    response = connection.getresponse()
    assert response.status == 200, response.read()


def test_unknown_models_and_paths_are_404_and_big_bodies_413(server):
    _assert_error(httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "gpt-4")
    _assert_error(httpx.get(f"{server.url}/v1/nothing"), 404, "/v1/nothing")
    big = {"prompt": "x" * (17 * 2**20)}
    _assert_error(httpx.post(f"{server.url}/v1/completions", json=big, timeout=60), 413, "larger")


BIG_BODY = json.dumps({"prompt": "x" * (17 * 2**20)}).encode()  # a little over the server's 16 MiB limit


def _upload(port: int, chunked: bool, body: bytes = BIG_BODY) -> tuple[bytes, str | None]:
    """POST `body` to /v1/completions over a raw socket (with its Content-Length, or chunked), as curl does: the
    whole body, then the answer up to the server's close. What came, and how the connection failed if it did."""
    how = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % how)
            for start in range(0, len(body), 2**16):
                piece = body[start:start + 2**16]
                connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                connection.sendall(b"0\r\n\r\n")
            while piece := connection.recv(2**16):
                answer += piece
        except OSError as error:
            return answer, f"{type(error).__name__} after {len(answer)} bytes of answer"
    return answer, None


@pytest.mark.slow
def test_every_client_of_a_refused_upload_gets_the_413_and_a_clean_close(server):
    # 24 clients at once, 4 rounds each, Content-Length and chunked in turn: the server answers before the upload
    # has arrived; closing with unread bytes would reset the connection under a client that is still sending.
    port, rounds, deadline = int(server.url.rsplit(":", 1)[1]), 4, time.monotonic() + 25
    failures, sent = [], []

    def client(index: int) -> None:
        for round_ in range(rounds):
            if time.monotonic() > deadline:
                return
            sent.append(1)
            answer, failure = _upload(port, chunked=(index + round_) % 2 == 1)
            head, _, body = answer.partition(b"\r\n\r\n")
            if failure or not head.startswith(b"HTTP/1.1 413") or b"connection: close" not in head.lower():
                failures.append(failure or head[:40])
                continue
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and "larger" in error["message"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, f"{len(failures)} of {len(sent)} clients got no clean 413: {sorted(set(failures))[:4]}"
    assert len(sent) >= 48  # at least half the rounds ran within the time bound
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_an_endless_upload_is_cut_off(server, chunked):
    from llama.serve.app import DISCARD_BODY_FACTOR, MAX_BODY_BYTES

    port = int(server.url.rsplit(":", 1)[1])
    bound = DISCARD_BODY_FACTOR * MAX_BODY_BYTES
    _, failure = _upload(port, chunked, body=b"x" * (2 * bound))  # the server stops reading at `bound`
    assert failure and "Error" in failure
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("headers, discards", [([(b"content-length", b"99")], True),
                                               ([(b"content-length", b"99"), (b"expect", b"100-continue")], False)])
def test_a_stalled_upload_is_dropped_after_the_time_bound(monkeypatch, headers, discards):
    import asyncio

    from llama.serve import app as app_module

    monkeypatch.setattr(app_module, "DISCARD_SECONDS", 0.2)
    received, sent = [], []

    async def receive():  # one piece, then a client that sends nothing more and stays connected
        if received:
            await asyncio.Event().wait()
        received.append(1)
        return {"type": "http.request", "body": b"x" * 10, "more_body": True}

    async def send(message):
        sent.append(message)

    guard = app_module.Guard(None, api_key=None, max_body_bytes=10)
    started = time.monotonic()
    asyncio.run(guard({"type": "http", "path": "/v1/completions", "headers": headers}, receive, send))
    assert time.monotonic() - started < 5
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["message"] == "the request body is larger than 10 bytes"
    assert [m.get("more_body", False) for m in sent[1:]] == ([True, False] if discards else [False])
    assert received == ([1] if discards else [])


def test_the_api_key_is_required_when_set(strict_server):
    url = f"{strict_server.url}/v1/models"
    _assert_error(httpx.get(url), 401, "no API key")
    _assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, "wrong")
    assert httpx.get(url, headers={"Authorization": "Bearer secret"}).json()["data"][0]["id"] == "strict"
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_full_queue_is_429_with_retry_after(strict_server):
    headers = {"Authorization": "Bearer secret"}
    body = {"prompt": "Once", "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{strict_server.url}/v1/completions", json=body, headers=headers) as running:
        lines = running.iter_lines()  # held: a dropped iterator closes the connection, which cancels the request
        next(lines)
        response = httpx.post(f"{strict_server.url}/v1/completions", json={"prompt": "Hi"}, headers=headers)
        _assert_error(response, 429, "busy")
        assert response.headers["Retry-After"]
    _wait_idle(strict_server)


def test_a_client_that_leaves_cancels_its_unstreamed_request(strict_server):
    body = {"prompt": "Once", "max_tokens": 4000}  # sampled: minutes of work for this placeholder-sized model
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{strict_server.url}/v1/completions", json=body, headers={"Authorization": "Bearer secret"},
                   timeout=1)
    _wait_idle(strict_server, timeout=5)


def test_sigterm_finishes_running_requests_and_exits_0(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint(1), *FLAGS)
    body = {"prompt": "Once", "max_tokens": 200, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        server.process.send_signal(signal.SIGTERM)
        rest = [json.loads(line[6:]) for line in lines if line and line != "data: [DONE]"]
    assert rest[-2]["choices"][0]["finish_reason"] == "length" and rest[-1]["usage"]["completion_tokens"] == 200
    assert server.process.wait(60) == 0, server.log()[-3000:]


def test_two_torchrun_processes_serve_the_one_process_text(start_server, tiny_checkpoint, server):
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    expected = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    two = start_server(tiny_checkpoint(1), *FLAGS, nproc=2)
    assert httpx.post(f"{two.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == expected
    # SIGTERM to the listening process: it releases the other one, and all of torchrun ends with status 0.
    rank0 = int(re.search(r"Started server process \[(\d+)\]", two.log()).group(1))
    os.kill(rank0, signal.SIGTERM)
    assert two.process.wait(60) == 0, two.log()[-3000:]


@pytest.mark.parametrize("flags, message", [(["--port", "http"], "--port must be an integer"),
                                            (["--max_queue", "-1"], "max_queue must be an integer >= 0"),
                                            (["--stream_timeout", "0"], "stream_timeout must be a number of seconds"),
                                            (["--prot", "80"], "did you mean --port")])
def test_bad_flags_are_one_line_errors(tiny_checkpoint, monkeypatch, capsys, flags, message):
    serve = importlib.import_module("llama.serve.__main__")
    monkeypatch.setattr(sys, "argv", ["llama.serve", "--ckpt_dir", str(tiny_checkpoint(1)), *flags])
    with pytest.raises(SystemExit) as exit:
        serve.run(serve.main, "llama.serve")
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and stderr.startswith("error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("stop", ["lo w", "o", "world!", "d! 🦙"])
def test_stop_strings_are_cut_across_tokens_and_never_sent_in_part(tokenizer, stop):
    from llama.serve.reply_assembly import ChoiceText

    text, cut = "Hello world! 🦙 and more", "Hello world! 🦙 and more".index(stop)
    tokens = tokenizer.encode(text, bos=False, eos=False)
    choice = ChoiceText(tokenizer, [stop, "never"])
    sent = [choice.feed([token]) for token in tokens]
    sent.append(choice.finish())
    assert choice.stopped and "".join(sent) == text[:cut]
    assert not any(stop[:2] in piece for piece in sent if len(stop) > 1)
    # The tokens kept (for logprobs and usage) are those whose text starts before the cut.
    assert choice.n_kept() == sum(1 for i in range(len(tokens)) if len(tokenizer.decode(tokens[:i])) < cut)
