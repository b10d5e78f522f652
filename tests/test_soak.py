"""A soak: 32 clients at once for a bounded time (LLAMA_SOAK_SECONDS, default 90) against one server with fewer
slots than clients, mixing every kind of request a real crowd sends. The server never answers 5xx, every greedy
reply is its solo reply, every slot is free at the end, and its memory stays flat."""

import json
import os
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("LLAMA_SOAK_SECONDS", 90))
CLIENTS, MAX_SEQ_LEN, MAX_BATCH = 32, 256, 4
FILLER = 8315  # one token of 64 "="
AT_LIMIT = [128000] + [FILLER] * (MAX_SEQ_LEN - 2)  # leaves room for exactly one new token: accepted
OVER_LIMIT = AT_LIMIT + [FILLER]  # no room: 400 context_length_exceeded
TOO_BIG = json.dumps({"prompt": "x" * (16 * 2**20 + 1024)}).encode()  # just over the 16 MiB body limit
# Greedy requests whose replies are compared with their solo runs: (path, body).
GREEDY = [("/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0})
          for p in ("The capital of France is", "Hello", "1, 2, 3, 4,", "Once upon a time") for n in (4, 40)]
GREEDY += [("/v1/chat/completions", {"messages": [{"role": "user", "content": c}], "max_tokens": 24, "temperature": 0})
           for c in ("Name three uses of a paperclip.", "What is 2 + 2?")]
GREEDY += [("/v1/completions", {"prompt": AT_LIMIT, "max_tokens": 5, "temperature": 0})]


def _text(path: str, reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


def _streamed_text(path: str, lines: list[str]) -> tuple[str, list[dict]]:
    """The text of a streamed reply's events, and the error events among them."""
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    errors = [e for e in events if "error" in e]
    pieces = [c["delta"].get("content") or "" if "delta" in c else c["text"]
              for e in events if "error" not in e for c in e["choices"]]
    return "".join(pieces), errors


def _rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


def _metric(url: str, name: str) -> float:
    return float(re.search(rf"^llama:{name}\{{[^}}]*\}} (\S+)$", httpx.get(f"{url}/metrics").text, re.M).group(1))


class Crowd:
    """The clients' shared record: what each kind of request met, and every failure in words."""

    def __init__(self, url: str, solo: list[str]):
        self.url, self.solo = url, solo
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def note(self, kind: str, failure: str | None = None) -> None:
        with self._lock:
            self.counts[kind] += 1
            if failure:
                self.failures.append(f"{kind}: {failure}")

    def client(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        kinds = [self.greedy, self.greedy, self.greedy, self.dropped, self.malformed, self.at_the_limit,
                 self.over_the_limit]
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                kind = self.too_big if rng.random() < 0.01 else rng.choice(kinds)
                try:
                    kind(http, rng)
                except httpx.HTTPError as error:
                    self.note(kind.__name__, f"{type(error).__name__}: {error}")

    def greedy(self, http: httpx.Client, rng: random.Random) -> None:
        index = rng.randrange(len(GREEDY))
        path, body = GREEDY[index]
        if rng.random() < 0.5:
            response = http.post(path, json=body)
            ok = response.status_code == 200
            text, errors = (_text(path, response.json()), []) if ok else (response.text, [])
        else:
            with http.stream("POST", path, json={**body, "stream": True}) as response:
                ok = response.status_code == 200
                text, errors = _streamed_text(path, list(response.iter_lines())) if ok else ("", [])
        wrong = not ok or errors or text != self.solo[index]
        self.note("greedy", f"{response.status_code} {errors} {text!r} != {self.solo[index]!r}" if wrong else None)

    def dropped(self, http: httpx.Client, rng: random.Random) -> None:
        """A sampled stream the client leaves after a few events."""
        body = {"prompt": "Once", "max_tokens": 200, "temperature": 1.0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(rng.randint(1, 6)):
                next(lines)
        self.note("dropped", None if response.status_code == 200 else str(response.status_code))

    def malformed(self, http: httpx.Client, rng: random.Random) -> None:
        response = http.post(rng.choice(["/v1/completions", "/v1/chat/completions"]), content=b'{"prompt": "Hi",')
        self.note("malformed", None if response.status_code == 400 else f"{response.status_code} {response.text}")

    def too_big(self, http: httpx.Client, rng: random.Random) -> None:
        response = http.post("/v1/completions", content=TOO_BIG)
        self.note("too_big", None if response.status_code == 413 else f"{response.status_code} {response.text}")

    def at_the_limit(self, http: httpx.Client, rng: random.Random) -> None:
        response = http.post("/v1/completions", json={"prompt": AT_LIMIT, "max_tokens": 3})
        reason = response.json()["choices"][0]["finish_reason"] if response.status_code == 200 else None
        self.note("at_the_limit", None if reason == "length" else f"{response.status_code} {response.text[:300]}")

    def over_the_limit(self, http: httpx.Client, rng: random.Random) -> None:
        response = http.post("/v1/completions", json={"prompt": OVER_LIMIT, "max_tokens": 3})
        code = response.json().get("error", {}).get("code") if response.status_code == 400 else None
        self.note("over_the_limit", None if code == "context_length_exceeded" else f"{response.status_code}")


def test_32_clients_for_a_while(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint(1), "--device", "cpu", "--dtype", "float32", "--max_seq_len",
                          str(MAX_SEQ_LEN), "--max_batch_size", str(MAX_BATCH))
    solo = [_text(path, httpx.post(f"{server.url}{path}", json=body, timeout=120).json()) for path, body in GREEDY]
    crowd = Crowd(server.url, solo)
    started = time.monotonic()
    clients = [threading.Thread(target=crowd.client, args=(seed, started + SECONDS)) for seed in range(CLIENTS)]
    for client in clients:
        client.start()
    time.sleep(max(15.0, SECONDS / 4))  # warmed up: every kind of request has run, the allocators have grown
    warm = _rss_kib(server.process.pid)
    for client in clients:
        client.join(SECONDS + 300)
    end = _rss_kib(server.process.pid)
    print(f"\nsoak: {SECONDS:.0f} s, {sum(crowd.counts.values())} requests {dict(crowd.counts)}; "
          f"RSS {warm} KiB warm, {end} KiB at the end ({100 * (end / warm - 1):+.1f} %)")
    assert not crowd.failures, f"{len(crowd.failures)} failures: {crowd.failures[:5]}"
    assert all(crowd.counts[kind] for kind in ("greedy", "dropped", "malformed", "at_the_limit", "over_the_limit"))
    deadline = time.monotonic() + 10  # the last dropped streams' cancellations may still be on their way
    while (_metric(server.url, "num_requests_running") or _metric(server.url, "num_requests_waiting")) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server.url, "num_requests_running") == 0 and _metric(server.url, "num_requests_waiting") == 0
    assert httpx.get(f"{server.url}/health").json()["sequences"] == 0
    assert end < 1.05 * warm
    assert " 500 " not in server.log() and "Traceback" not in server.log(), server.log()[-3000:]
