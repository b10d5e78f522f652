"""`torchrun -m llama.serve` as several processes: two nodes simulated on 127.0.0.1 serve what one process serves,
and a follower that dies makes the listening process say so in one line and exit with status 1, never hang (the
runner's part of that is also checked alone, without torchrun)."""

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from conftest import ServerProcess, unused_port

FLAGS = ["--device", "cpu", "--dtype", "float32", "--max_seq_len", "2048"]
BODY = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
LOST = "error: process 1 of 2 stopped or failed"


def _rank0(server: ServerProcess) -> int:
    return int(re.search(r"Started server process \[(\d+)\]", server.log()).group(1))


def _assert_exits_with_the_one_line(server: ServerProcess, killed_at: float) -> None:
    """torchrun ends within 30 s of the kill, its first process having said why in one line and exited with 1
    (not killed by torchrun's SIGKILL after its SIGTERM went unheeded)."""
    status = server.process.wait(40)
    log = server.log()
    assert time.monotonic() - killed_at < 30, log[-3000:]
    assert status != 0 and log.count(LOST) == 1 and "the server cannot continue" in log, log[-3000:]
    assert re.search(rf"exitcode\s*: 1 \(pid: {_rank0(server)}\)", log), log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["idle", "serving"])
def test_a_follower_killed_ends_the_server_with_one_line(start_server, tiny_checkpoint, when):
    server = start_server(tiny_checkpoint(1), *FLAGS, nproc=2)
    rank0 = _rank0(server)
    follower = next(pid for pid in server.workers() if pid != rank0)
    events = []

    def stream() -> None:  # a reply far longer than the test: it is running when the follower dies
        body = {"prompt": "Once", "max_tokens": 2000, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            events.extend(json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {"))

    client = threading.Thread(target=stream)
    if when == "serving":
        client.start()
        while not events and client.is_alive():
            time.sleep(0.01)
    else:
        time.sleep(1)
    killed_at = time.monotonic()
    os.kill(follower, signal.SIGKILL)
    _assert_exits_with_the_one_line(server, killed_at)
    if when == "serving":
        client.join(10)
        assert not client.is_alive() and "error" in events[-1], events[-3:]


@pytest.mark.slow
def test_two_nodes_on_localhost_serve_the_one_process_text(start_server, tiny_checkpoint, build_tiny, tmp_path):
    expected = build_tiny(max_seq_len=256).text_completion([BODY["prompt"]], temperature=0,
                                                           max_gen_len=BODY["max_tokens"])[0]["generation"]
    nodes = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={unused_port()}"]
    # Node 1 first: node 0's start waits for the server to answer, which needs both nodes in the rendezvous.
    node1 = ServerProcess(tmp_path / "node1.log", tiny_checkpoint(1), *FLAGS, torchrun=[*nodes, "--node_rank=1"])
    try:
        node0 = start_server(tiny_checkpoint(1), *FLAGS, torchrun=[*nodes, "--node_rank=0"])
        reply = httpx.post(f"{node0.url}/v1/completions", json=BODY, timeout=60).json()
        assert reply["choices"][0]["text"] == expected
        # Node 0's torchrun does not watch node 1's process: the idle first process notices it is gone by itself.
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(node1.workers()[0], signal.SIGKILL)
        _assert_exits_with_the_one_line(node0, killed_at)
        assert node1.process.wait(30) != 0
    finally:
        node1.stop()


class _IdleEngine:
    """An engine with no work whose release of the other processes fails, as it does when one of them is gone."""

    def __init__(self):
        self.pings = 0

    def step(self) -> bool:
        return False

    def ping(self) -> None:
        self.pings += 1

    def shutdown(self) -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1")


def test_an_idle_runner_pings_and_a_failed_release_still_ends_its_stop(monkeypatch):
    from llama.serve import runner as runner_module

    monkeypatch.setattr(runner_module, "PING_SECONDS", 0.05)
    engine, raised = _IdleEngine(), []
    runner = runner_module.EngineRunner(engine, capacity=4)

    def run() -> None:
        try:
            runner.run()
        except RuntimeError as error:
            raised.append(str(error))

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    stopping = threading.Thread(target=runner.stop)  # the HTTP side's lifespan waits here for run() to end
    stopping.start()
    stopping.join(5)
    thread.join(5)
    assert not stopping.is_alive() and not thread.is_alive()
    assert engine.pings >= 3 and raised == ["Connection closed by peer [127.0.0.1]:1"]
