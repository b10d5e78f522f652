"""Clients that stop reading their replies: `--stream_timeout` gives up a streamed reply that cannot be written for
that long, freeing its slots, while every other client is served as usual; a whole reply is written in one go."""

import asyncio
import json
import re
import socket
import time

import httpx
import pytest

STREAM_TIMEOUT = 2
STOPS = {"128001": -100, "128008": -100, "128009": -100}  # no stop token: the reply runs to max_tokens
STALLED = "read nothing of its reply to /v1/chat/completions for 2 s"


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint(1), "--device", "cpu", "--dtype", "float32", "--max_seq_len", "4096",
                        "--max_batch_size", "2", "--stream_timeout", str(STREAM_TIMEOUT))


def _metric(server, name: str, labels: str = "") -> float:
    pattern = rf"^llama:{name}\{{[^}}]*{labels}[^}}]*\}} (\S+)$"
    found = re.findall(pattern, httpx.get(f"{server.url}/metrics").text, re.MULTILINE)
    return sum(map(float, found))


def _non_reader(port: int, body: dict) -> socket.socket:
    """A client that sends `body` to /v1/chat/completions and then reads nothing. Its small window (a 4 KiB
    receive buffer, 536-byte segments, as a slow link has) keeps the kernel from buffering megabytes of the reply
    on loopback before the server's writes have to wait."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    client.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return client


def _read_to_the_end(client: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sent, up to its close (a reset counts as a close)."""
    client.settimeout(timeout)
    received = b""
    try:
        while piece := client.recv(2**16):
            received += piece
    except ConnectionResetError:
        pass
    return received


def _wait_idle(server, timeout: float) -> float:
    """Seconds until no sequence runs or waits (per /metrics); fails after `timeout`."""
    started = time.monotonic()
    while _metric(server, "num_requests_running") or _metric(server, "num_requests_waiting"):
        assert time.monotonic() - started < timeout, httpx.get(f"{server.url}/metrics").text[-2000:]
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.slow
def test_a_stream_nobody_reads_is_given_up_while_others_are_served(server):
    aborted = _metric(server, "request_success_total", 'finished_reason="abort"')
    # Each event carries 20 alternatives per token: a few KiB, so the buffers fill within seconds.
    stalled = _non_reader(server.port, {"messages": [{"role": "user", "content": "Once"}], "stream": True,
                                        "max_tokens": 4000, "temperature": 1.0, "logprobs": True,
                                        "top_logprobs": 20, "logit_bias": STOPS})
    solo = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "temperature": 0},
                      timeout=60).json()["choices"][0]["text"]
    while _metric(server, "num_requests_running") and STALLED not in server.log():  # the other slot serves them
        started = time.monotonic()
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": "Hi", "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
        assert reply == solo and time.monotonic() - started < 5
    _wait_idle(server, timeout=60)
    assert _metric(server, "request_success_total", 'finished_reason="abort"') == aborted + 1  # cancelled
    assert server.log().count(STALLED) == 1
    received = _read_to_the_end(stalled)  # the server closed the connection (a reply of 4000 tokens would not)
    assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received and len(received) < 2**20
    stalled.close()


@pytest.mark.slow
def test_a_whole_reply_nobody_reads_is_written_at_once_and_ends(server):
    # The reply (300 tokens with 20 alternatives each, about 600 KiB of JSON) is far larger than what the client's
    # window takes; it is handed to the server's buffer whole, the request ends, and nothing waits on the client.
    ended = _metric(server, "request_success_total", 'finished_reason="length"')
    idle = _non_reader(server.port, {"messages": [{"role": "user", "content": "Once"}], "max_tokens": 300,
                                     "temperature": 1.0, "logprobs": True, "top_logprobs": 20,
                                     "logit_bias": STOPS})
    _wait_idle(server, timeout=120)
    assert _metric(server, "request_success_total", 'finished_reason="length"') == ended + 1
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    received = _read_to_the_end(idle, timeout=5 * STREAM_TIMEOUT)
    reply = json.loads(received.partition(b"\r\n\r\n")[2])
    assert len(reply["choices"][0]["logprobs"]["content"]) == 300
    idle.close()


class _Cycle:
    """What uvicorn's `send` is a method of: a request cycle holding the connection's transport."""

    def __init__(self):
        self.transport = self
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    async def send(self, message) -> None:
        if message.get("more_body"):  # the client reads nothing: the body's writes never complete
            await asyncio.Event().wait()


def test_the_write_deadline_drops_the_connection_and_ends_the_reply():
    from llama.serve.slow_clients import WriteDeadline

    cycle, events = _Cycle(), []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        except OSError as error:
            events.append(str(error))
            raise

    scope = {"type": "http", "path": "/v1/completions", "client": ("127.0.0.1", 5)}
    started = time.monotonic()
    asyncio.run(WriteDeadline(app, 0.2)(scope, None, cycle.send))
    assert 0.2 <= time.monotonic() - started < 5
    assert cycle.aborted and events == ["the client read nothing for 0.2 s"]


@pytest.mark.parametrize("seconds", [0, -1, "60", True])
def test_the_write_deadline_is_a_positive_number_of_seconds(seconds):
    from llama.serve.slow_clients import WriteDeadline

    with pytest.raises(ValueError, match="stream_timeout must be a number of seconds > 0"):
        WriteDeadline(None, seconds)
