"""GET /metrics of a real server process: Prometheus' text format, vLLM's metric names under `llama:`, counts that
agree with the usage the replies report, and gauges that follow the engine."""

import time

import httpx
import pytest

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

MAX_SEQ_LEN, MAX_BATCH, MODEL = 256, 2, "tiny"
LABEL = {"model_name": MODEL}


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    return start_server(tiny_checkpoint(1), "--device", "cpu", "--dtype", "float32", "--max_seq_len",
                        str(MAX_SEQ_LEN), "--max_batch_size", str(MAX_BATCH), "--model_name", MODEL,
                        "--api_key", "secret")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="secret", max_retries=0, timeout=60)


def _scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics (asked without the API key), by name and labels."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in parser.text_string_to_metric_families(response.text) for sample in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((f"llama:{name}", frozenset({**LABEL, **labels}.items())), 0.0)


def _wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/health").json()["sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").json()["sequences"] == 0


def _usages(client) -> list:
    """The usage of a chat and a completion, each whole and streamed."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name three uses of a paperclip."}],
            "temperature": 0, "max_tokens": 12}
    completion = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 9}
    usages = [client.chat.completions.create(**chat).usage, client.completions.create(**completion).usage]
    for create, body in ((client.chat.completions.create, chat), (client.completions.create, completion)):
        chunks = list(create(**body, stream=True, stream_options={"include_usage": True}))
        usages.append(chunks[-1].usage)
    return usages


def test_counters_and_histograms_agree_with_the_replies_usage(server, client):
    before = _scrape(server)
    usages = _usages(client)
    _wait_idle(server)
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    generated = [u.completion_tokens for u in usages]
    assert all(generated)
    assert delta("prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("generation_tokens_total") == sum(generated)
    assert delta("time_to_first_token_seconds_count") == len(usages)
    assert delta("inter_token_latency_seconds_count") == sum(n - 1 for n in generated)
    assert delta("e2e_request_latency_seconds_count") == len(usages)
    reasons = {reason: delta("request_success_total", finished_reason=reason) for reason in ("stop", "length")}
    assert sum(reasons.values()) == len(usages)
    assert delta("e2e_request_latency_seconds_sum") >= delta("time_to_first_token_seconds_sum") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert (f"llama:{gauge}", frozenset(LABEL.items())) in after and _value(after, gauge) == 0


def test_a_request_in_flight_is_running_and_holds_a_kv_slot(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": MAX_SEQ_LEN - 10,
            "stream": True}
    aborted = _value(_scrape(server), "request_success_total", finished_reason="abort")
    headers = {"Authorization": "Bearer secret"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        during = _scrape(server)
    assert _value(during, "num_requests_running") == 1 and _value(during, "num_requests_waiting") == 0
    assert _value(during, "kv_cache_usage_perc") == 1 / MAX_BATCH
    _wait_idle(server)  # the client left: the sequence was cancelled
    after = _scrape(server)
    assert _value(after, "request_success_total", finished_reason="abort") == aborted + 1
    assert _value(after, "num_requests_running") == 0 and _value(after, "kv_cache_usage_perc") == 0


def test_metrics_need_no_api_key_while_the_api_does(server):
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_a_chat_resent_counts_its_prompt_as_looked_up_and_reused(server, client):
    """The second time, every prompt token but the last (which must give logits) comes from the slot the first
    run left behind."""
    chat = {"model": MODEL, "temperature": 0, "max_tokens": 4, "messages": [
        {"role": "user", "content": "Name three uses of a paperclip, and then three uses of a rubber band."}]}
    first = client.chat.completions.create(**chat)
    _wait_idle(server)
    before = _scrape(server)
    second = client.chat.completions.create(**chat)
    after = _scrape(server)

    def delta(name: str) -> float:
        return _value(after, name) - _value(before, name)

    prompt = first.usage.prompt_tokens
    assert prompt > 16 and second.usage.prompt_tokens == prompt
    assert delta("prefix_cache_queries_total") == prompt
    assert delta("prefix_cache_hits_total") == prompt - 1
    assert second.choices[0].message.content == first.choices[0].message.content


def test_the_engines_own_totals_are_vllms_prefix_cache_and_spec_decode_counters():
    from types import SimpleNamespace

    from llama.engine import EngineStats
    from llama.serve.metrics import Metrics

    stats = EngineStats(prefix_queried_tokens=50, prefix_hit_tokens=40, drafts=3, draft_tokens=12, accepted_tokens=7)
    metrics = Metrics(SimpleNamespace(slots=[None, None], running=[], queue=[], stats=stats), MODEL)
    samples = {(s.name, frozenset(s.labels.items())): s.value for family in
               parser.text_string_to_metric_families(metrics.exposition().decode()) for s in family.samples}
    expected = {"prefix_cache_queries_total": 50, "prefix_cache_hits_total": 40, "spec_decode_num_drafts_total": 3,
                "spec_decode_num_draft_tokens_total": 12, "spec_decode_num_accepted_tokens_total": 7}
    assert {name: _value(samples, name) for name in expected} == expected
    stats.accepted_tokens += 5  # read when scraped
    assert f'llama:spec_decode_num_accepted_tokens_total{{model_name="{MODEL}"}} 12.0' in metrics.exposition().decode()
