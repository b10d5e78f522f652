"""Benchmark serving: streaming clients against `python -m llama.serve`, beside the library's static
`Llama.generate` on the same prompts and llama-cpp-python's OpenAI server on the same weights.

    python benchmarks/serve.py --preset 1B --dtype bfloat16 --clients 1,4,8,16 --prompt_words 96 --max_tokens 64
    python benchmarks/serve.py --preset 1B --request_rate 0.5,1 --num_prompts 32 --prompt_tokens 256
    python benchmarks/serve.py --preset 1B --workload chat --clients 4 --turns 3 --turn_tokens 64

The load, one run per entry of the list that drives it:
- `--clients N` (fixed concurrency): N jobs start at the same moment;
- `--request_rate R` (requests per second, instead of --clients): `--num_prompts` jobs arrive as a Poisson process
  (exponential gaps with mean 1/R, drawn from `--seed`; the first at once), however many are still running.
A job is one request of the `completions` workload: a streamed `/v1/completions` request (greedy, `max_tokens` new
tokens) whose prompt is `--prompt_words` random words or, with `--prompt_tokens N`, N token ids
(`<|begin_of_text|>` and N - 1 ids drawn uniformly from the ordinary vocabulary, sent as ids; llama.cpp's server
gets their decoded text and counts its own prompt tokens). Or it is a conversation of the `chat` workload: `--turns`
streamed `/v1/chat/completions` requests one after another, each resending the whole history (every earlier user
message and reply) plus a new user message of `--turn_tokens` random words (each word is one token of Llama 3's
vocabulary). After all conversations end, each follow-up turn's exact messages are sent again "cold", all
conversations at once one turn index after another, so that TTFT per turn index compares a follow-up with the same
prompt sent without its conversation before it. Ours keeps finished sequences' KV to reuse their prefixes, so its
cold resends go to a second server of the same checkpoint started with `--prefix_reuse False` (idle until then);
llama.cpp's server gets them itself, and reuses the longest prefix shared with the prompt it ran last.

Every chunk carrying text is timed as it arrives (request = the moment the request is sent):
- TTFT: request → first text chunk; TPOT: (end of the reply - first text chunk) / (output tokens - 1), for requests
  of at least 2 output tokens; ITL: every gap between consecutive text chunks of a request (a chunk usually carries
  one token; the server holds back a token that ends inside a UTF-8 character); E2EL: request → end of the reply.
  Each is given as mean, median and p99 (linear interpolation between the closest ranks) in ms, as `vllm bench
  serve` does;
- request throughput: completed requests / duration, where duration runs from the first request to the last reply's
  end; output token throughput: output tokens (from each reply's usage, else one per chunk) / duration; total token
  throughput counts the prompt tokens (from usage) too. Cold resends are timed alike but kept out of these.
- The first table (fixed concurrency, completions only; its format predates the figures above) gives total tok/s
  (= output token throughput), TTFT p50/p95 in s and the inter-token gaps' p50/p95 in ms (p95 as
  `statistics.quantiles`, i.e. nan for a single value).
The static figure is `Llama.generate` on the same prompts (tokenized as the server does) in one call, at the batch
size of the run (--clients) or at the server's `--max_batch_size` (--request_rate: all `--num_prompts` at once,
queued beyond that), timed from call to return the same way (prefill included), in its own process; it is left out
of the chat workload. llama-cpp-python (optional: `pip install "llama-cpp-python[server]"`, built from source) serves
a GGUF written from the same checkpoint (`benchmarks/gguf_export.py`, F16 for bfloat16/float16, F32 for float32).
Its server runs one request at a time (told to queue the others rather than interrupt the running one).
Every server and the static run get `--threads` threads and run alone. Each figure is the run with the median
output token throughput of `--repeats` runs (the same server process serves them all), each run with prompts of its
own (drawn from --seed, --seed + 1, ...) so that no run reuses a prefix an earlier one computed; the static runs
get the same prompts. Timings are only printed.
"""

import argparse
import asyncio
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # this clone's package, even where it is not installed
    sys.path.insert(0, str(HERE.parent))
from bench_args import positive_float_list, positive_int, positive_int_list  # noqa: E402
from bench_checkpoints import prepare_checkpoints  # noqa: E402

WORDS = ("river town market bread apple morning light window garden quiet music table paper stone winter road "
         "summer field cloud story letter friend number water history machine simple little").split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def token_prompts(n: int, length: int, bos_id: int, ordinary: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` token ids: <|begin_of_text|> and ids drawn from [0, ordinary)."""
    rng = random.Random(seed)
    return [[bos_id] + [rng.randrange(ordinary) for _ in range(length - 1)] for _ in range(n)]


def checkout_env() -> dict[str, str]:
    """The environment for child processes, with this checkout's package first on their path."""
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def start_server(command: list[str], port: int, threads: int, log: Path) -> subprocess.Popen:
    """Start a server process (its output to `log`) and wait until it answers GET /v1/models."""
    env = dict(checkout_env(), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "wb") as output:  # a file, not a pipe nobody reads, which would block a chatty server
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{command[:3]} did not start within 15 minutes; see {log}")


async def one_request(client: httpx.AsyncClient, url: str, body: dict, **labels: Any) -> dict[str, Any]:
    """Send one streamed request; time every chunk that carries text, keep the reply's text and usage."""
    sent, arrivals, text, usage = time.perf_counter(), [], [], {}
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            pieces = [choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                      for choice in chunk.get("choices", [])]
            if any(pieces):
                arrivals.append(time.perf_counter())
                text.extend(pieces)
    return {"sent": sent, "arrivals": arrivals, "done": time.perf_counter(), "text": "".join(text),
            "tokens": usage.get("completion_tokens", len(arrivals)), "prompt_tokens": usage.get("prompt_tokens", 0),
            **labels}


def completion_body(model: str, prompt: str | list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def conversation(client: httpx.AsyncClient, base: str, model: str, user_messages: list[str],
                       max_tokens: int) -> list[dict]:
    """One chat: each turn sends the whole history plus the next user message, then keeps the reply."""
    messages, records = [], []
    for turn, content in enumerate(user_messages):
        messages.append({"role": "user", "content": content})
        body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        records.append(await one_request(client, f"{base}/v1/chat/completions", body, turn=turn, request=body))
        messages.append({"role": "assistant", "content": records[-1]["text"]})
    return records


async def run_load(port: int, model: str, load: dict, args: argparse.Namespace,
                   cold_port: int | None = None) -> dict[str, Any]:
    """One run: start the jobs at their offsets (all 0 for fixed concurrency), then summarize every request. The
    chat workload's cold resends go to the server on `cold_port` (default: the same one)."""
    base = f"http://127.0.0.1:{port}"
    cold_base = f"http://127.0.0.1:{cold_port or port}"
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as client:
        def job(prompt: Any):
            if load["workload"] == "chat":
                return conversation(client, base, model, prompt, args.max_tokens)
            return one_request(client, f"{base}/v1/completions", completion_body(model, prompt, args.max_tokens))

        async def at(offset: float, prompt: Any):
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            return await job(prompt)

        started = time.perf_counter()
        results = await asyncio.gather(*(at(offset, prompt) for offset, prompt in zip(load["offsets"],
                                                                                      load["prompts"])))
        ended = time.perf_counter()
        records = [r for result in results for r in (result if isinstance(result, list) else [result])]
        cold = []
        if load["workload"] == "chat":  # each follow-up turn's exact messages again, without the conversation
            for turn in range(1, args.turns):
                bodies = [r["request"] for r in records if r["turn"] == turn]
                cold += await asyncio.gather(*(one_request(client, f"{cold_base}/v1/chat/completions", body,
                                                           turn=turn)
                                               for body in bodies))
    summary = summarize(records, ended - started)
    if load["workload"] == "chat":
        summary["turns"] = [{"turn": turn, "mean_prompt_tokens": statistics.mean(
                                 r["prompt_tokens"] for r in records if r["turn"] == turn),
                             **stats("ttft", [ttft(r) for r in records if r["turn"] == turn and r["arrivals"]]),
                             **stats("cold_ttft", [ttft(r) for r in cold if r["turn"] == turn and r["arrivals"]])}
                            for turn in range(args.turns)]
    return summary


def ttft(record: dict) -> float:
    return record["arrivals"][0] - record["sent"]


def percentile(values: list[float], q: float) -> float:
    """numpy's default percentile: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stats(name: str, seconds: list[float]) -> dict[str, float]:
    """Mean, median and p99 in ms, named as `vllm bench serve` names them (nan where nothing was measured)."""
    if not seconds:
        return {f"mean_{name}_ms": math.nan, f"median_{name}_ms": math.nan, f"p99_{name}_ms": math.nan}
    return {f"mean_{name}_ms": 1000 * statistics.mean(seconds), f"median_{name}_ms": 1000 * statistics.median(seconds),
            f"p99_{name}_ms": 1000 * percentile(seconds, 99)}


def summarize(records: list[dict], duration: float) -> dict[str, Any]:
    streamed = [r for r in records if r["arrivals"]]
    gaps = [b - a for r in records for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    output, prompt = sum(r["tokens"] for r in records), sum(r["prompt_tokens"] for r in records)
    return {"completed": len(records), "total_input_tokens": prompt, "total_output_tokens": output,
            "duration": duration, "request_throughput": len(records) / duration,
            "output_throughput": output / duration, "total_token_throughput": (prompt + output) / duration,
            **stats("ttft", [ttft(r) for r in streamed]),
            **stats("tpot", [(r["done"] - r["arrivals"][0]) / (r["tokens"] - 1) for r in streamed if r["tokens"] > 1]),
            **stats("itl", gaps), **stats("e2el", [r["done"] - r["sent"] for r in records]),
            # the first table's figures (seconds)
            "tok_s": output / duration, **percentiles("ttft", [ttft(r) for r in streamed]),
            **percentiles("itl", gaps)}


def percentiles(name: str, values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {f"{name}_p50": values[0] if values else float("nan"), f"{name}_p95": float("nan")}
    cuts = statistics.quantiles(values, n=20)
    return {f"{name}_p50": statistics.median(values), f"{name}_p95": cuts[18]}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output token throughput (the lower middle one of an even number)."""
    return sorted(runs, key=lambda run: run["tok_s"])[(len(runs) - 1) // 2]


def serve_and_measure(command: list[str], repeats: list[dict], args: argparse.Namespace, model: str | None,
                      as_text: bool = False, cold_command: list[str] | None = None) -> dict:
    """Each load's median run out of `repeats` (one dict of loads per run: fresh prompts each time, so that no
    run reuses what an earlier one computed). With `cold_command`, a second server of that command (started
    alongside, idle otherwise) answers the chat workload's cold resends."""
    servers = []
    try:
        for server_command in filter(None, [command, cold_command]):
            port = free_port()
            log = Path(tempfile.gettempdir()) / f"llama3-bench-server-{port}.log"
            servers.append((port, start_server([*server_command, "--port", str(port)], port, args.threads, log)))
        port, cold_port = servers[0][0], servers[-1][0]
        model = model or httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        warm_up = {"workload": "completions", "offsets": [0], "prompts": prompts(1, 8, seed=99)}
        for warm_port in {port, cold_port}:
            asyncio.run(run_load(warm_port, model, warm_up, argparse.Namespace(**{**vars(args), "max_tokens": 4})))
        return {label: median_run([asyncio.run(run_load(port, model, as_text_load(loads[label]) if as_text
                                                        else loads[label], args, cold_port))
                                   for loads in repeats]) for label in repeats[0]}
    finally:
        for _, process in servers:
            process.terminate()
            process.wait(timeout=60)


def as_text_load(load: dict) -> dict:
    """Token-id prompts as text, for a server that takes text only (it adds its own <|begin_of_text|>)."""
    if load["workload"] == "chat" or not load["prompts"] or isinstance(load["prompts"][0], str):
        return load
    return {**load, "prompts": [TOKENIZER.decode(ids[1:]) for ids in load["prompts"]]}


TOKENIZER: Any = None

STATIC = """
import json, sys, time, torch
from llama import Llama
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
llama = Llama.build(spec["ckpt"], max_seq_len=spec["max_seq_len"], max_batch_size=spec["max_batch_size"],
                    device="cpu", dtype=spec["dtype"])
encode = lambda p: llama.tokenizer.encode(p, bos=llama.tokenizer.add_bos, eos=False) if isinstance(p, str) else p
llama.generate([encode("warm up")], 4, temperature=0)
rates = {}
for label, runs_texts in spec["prompts"].items():
    runs = []
    for texts in runs_texts:  # each run its own prompts, as the server gets them
        started = time.perf_counter()
        tokens, _ = llama.generate([encode(t) for t in texts], spec["max_tokens"], temperature=0)
        runs.append(sum(map(len, tokens)) / (time.perf_counter() - started))
    rates[label] = sorted(runs)[(len(runs) - 1) // 2]
print(json.dumps(rates))
"""


def static_generate(meta_dir: Path, repeats: list[dict], args: argparse.Namespace) -> dict | None:
    if args.workload == "chat":
        print("static generate has no conversations: its column is left out of the chat workload", flush=True)
        return None
    spec = {"ckpt": str(meta_dir), "threads": args.threads, "dtype": args.dtype, "max_batch_size": args.max_batch_size,
            "max_tokens": args.max_tokens, "max_seq_len": args.max_seq_len,
            "prompts": {str(label): [loads[label]["prompts"] for loads in repeats] for label in repeats[0]}}
    done = subprocess.run([sys.executable, "-c", STATIC, json.dumps(spec)], capture_output=True, text=True,
                          check=True, env=dict(checkout_env(), OMP_NUM_THREADS=str(args.threads)))
    rates = json.loads(done.stdout.strip().splitlines()[-1])
    return {label: rates[str(label)] for label in repeats[0]}


def llama_cpp_server(meta_dir: Path, repeats: list[dict], args: argparse.Namespace) -> dict | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        print("llama-cpp-python[server] is not installed: its column is left out", flush=True)
        return None
    from gguf_export import export_gguf

    tensor_type = "F32" if args.dtype == "float32" else "F16"
    gguf_path = meta_dir.parent / f"model-{tensor_type}.gguf"
    if not gguf_path.is_file():
        export_gguf(meta_dir, gguf_path.with_suffix(".partial"), tensor_type).rename(gguf_path)
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--n_ctx",
               str(args.max_seq_len), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--host", "127.0.0.1", "--interrupt_requests", "False"]  # queue concurrent requests, as ours does
    return serve_and_measure(command, repeats, args, model="llama.cpp", as_text=True)


def make_loads(args: argparse.Namespace, seed: int) -> dict:
    """The runs, by label (the number of clients, or "rate R"): each job's start offset and prompt (from `seed`;
    arrival times from --seed)."""
    def job_prompts(n: int, seed: int) -> list:
        if args.workload == "chat":
            rng = random.Random(seed)
            return [prompts(args.turns, args.turn_tokens, seed=rng.randrange(2**32)) for _ in range(n)]
        if args.prompt_tokens:
            return token_prompts(n, args.prompt_tokens, TOKENIZER.bos_id, min(TOKENIZER.special_tokens.values()),
                                 seed)
        return prompts(n, args.prompt_words, seed)

    if not args.request_rate:
        return {n: {"workload": args.workload, "offsets": [0.0] * n, "prompts": job_prompts(n, seed)}
                for n in args.clients}
    loads = {}
    for rate in args.request_rate:
        rng, offsets = random.Random(args.seed), [0.0]
        while len(offsets) < args.num_prompts:
            offsets.append(offsets[-1] + rng.expovariate(rate))
        loads[f"rate {rate:g}"] = {"workload": args.workload, "offsets": offsets,
                                   "prompts": job_prompts(args.num_prompts, seed)}
    return loads


def number(value: float, scale: float = 1, digits: int = 2) -> str:
    """A table cell: `value * scale`, or a dash where it could not be measured (a p95 of one value)."""
    return "–" if math.isnan(value) else f"{value * scale:.{digits}f}"


def report(args: argparse.Namespace, ours: dict, static: dict, cpp: dict | None) -> str:
    lines = ["| clients | total tok/s | TTFT p50 / p95 s | inter-token p50 / p95 ms | static generate tok/s | "
             "server / static | llama.cpp server tok/s | ours / llama.cpp |", "|---|---|---|---|---|---|---|---|"]
    for n in args.clients:
        row = ours[n]
        theirs = f"{cpp[n]['tok_s']:.1f} | {row['tok_s'] / cpp[n]['tok_s']:.2f}×" if cpp else "– | –"
        lines.append(
            f"| {n} | {row['tok_s']:.1f} | {number(row['ttft_p50'])} / {number(row['ttft_p95'])} | "
            f"{number(row['itl_p50'], 1000, 0)} / {number(row['itl_p95'], 1000, 0)} | {static[n]:.1f} | "
            f"{row['tok_s'] / static[n]:.2f}× | {theirs} |")
    return "\n".join(lines)


def load_name(label: int | str) -> str:
    return f"{label} clients" if isinstance(label, int) else label


def three(row: dict, name: str) -> str:
    return " / ".join(number(row[f"{kind}_{name}_ms"], 1, 1) for kind in ("mean", "median", "p99"))


def serving_report(results: dict[str, dict | None], static: dict | None) -> str:
    """vllm bench serve's figures, one row per server and run."""
    lines = ["| server | load | completed | req/s | output tok/s | total tok/s | TTFT mean / median / p99 ms | "
             "TPOT mean / median / p99 ms | ITL mean / median / p99 ms | static generate tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for label, row in (runs or {}).items():
            lines.append(f"| {name} | {load_name(label)} | {row['completed']} | {row['request_throughput']:.2f} | "
                         f"{row['output_throughput']:.1f} | {row['total_token_throughput']:.1f} | "
                         f"{three(row, 'ttft')} | {three(row, 'tpot')} | {three(row, 'itl')} | "
                         f"{f'{static[label]:.1f}' if static else '–'} |")
    return "\n".join(lines)


def turns_report(results: dict[str, dict | None]) -> str:
    """TTFT per turn index of the chat workload: in the conversation, and the same prompt sent cold."""
    lines = ["| server | load | turn | prompt tokens (mean) | TTFT mean / median / p99 ms | "
             "same prompt cold: TTFT mean / median / p99 ms |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for label, row in (runs or {}).items():
            for turn in row["turns"]:
                cold = three(turn, "cold_ttft") if turn["turn"] else "–"
                lines.append(f"| {name} | {load_name(label)} | {turn['turn'] + 1} | {turn['mean_prompt_tokens']:.0f} | "
                             f"{three(turn, 'ttft')} | {cold} |")
    return "\n".join(lines)


def main() -> None:
    global TOKENIZER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1B")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--clients", type=positive_int_list, default=[1, 4, 8, 16],
                        help="fixed concurrency: jobs started at once, one run each")
    parser.add_argument("--request_rate", type=positive_float_list, default=None,
                        help="requests (conversations) per second, Poisson arrivals, one run each; replaces --clients")
    parser.add_argument("--num_prompts", type=positive_int, default=64, help="jobs of a --request_rate run")
    parser.add_argument("--workload", default="completions", choices=("completions", "chat"))
    parser.add_argument("--prompt_words", type=positive_int, default=96)
    parser.add_argument("--prompt_tokens", type=positive_int, default=None,
                        help="prompts of this many random token ids instead of --prompt_words words")
    parser.add_argument("--turns", type=positive_int, default=3, help="turns of a chat conversation")
    parser.add_argument("--turn_tokens", type=positive_int, default=64, help="random words of each user message")
    parser.add_argument("--max_tokens", type=positive_int, default=64)
    parser.add_argument("--max_seq_len", type=positive_int, default=1024)
    parser.add_argument("--max_batch_size", type=positive_int, default=None,
                        help="the server's and static generate's (default: the largest of --clients)")
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    parser.add_argument("--request_timeout", type=float, default=600, help="seconds a reply may stall")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per figure; the median is shown")
    parser.add_argument("--impls", default="ours,static,llama.cpp", help="which of ours, static, llama.cpp to run")
    parser.add_argument("--cache_dir", type=Path, default=Path.home() / ".cache" / "llama3-bench")
    args = parser.parse_args()
    if args.prompt_tokens and args.workload == "chat":
        parser.error("--prompt_tokens is for the completions workload (chat messages are --turn_tokens words)")
    args.max_batch_size = args.max_batch_size or max(args.clients)
    meta_dir, _ = prepare_checkpoints(args.cache_dir, args.preset, 0, with_hf=False)
    from llama.tokenizer import Tokenizer
    TOKENIZER = Tokenizer(meta_dir / "tokenizer.model")
    repeats = [make_loads(args, args.seed + repeat) for repeat in range(args.repeats)]
    impls = args.impls.split(",")
    ours_command = [sys.executable, "-m", "llama.serve", "--ckpt_dir", str(meta_dir), "--max_batch_size",
                    str(args.max_batch_size), "--max_seq_len", str(args.max_seq_len), "--dtype", args.dtype,
                    "--max_queue", str(max(256, args.num_prompts if args.request_rate else 0))]
    # The chat workload's cold resends go to a second server that reuses no prefix (ours keeps KV between requests).
    cold_command = [*ours_command, "--prefix_reuse", "False"] if args.workload == "chat" else None
    ours = serve_and_measure(ours_command, repeats, args, None, cold_command=cold_command) if "ours" in impls else None
    static = static_generate(meta_dir, repeats, args) if "static" in impls else None
    cpp = llama_cpp_server(meta_dir, repeats, args) if "llama.cpp" in impls else None
    print(json.dumps({"ours": ours, "static": static, "llama.cpp": cpp}))
    tables = [serving_report({"ours": ours, "llama.cpp": cpp}, static)]
    if ours and static and not args.request_rate:
        tables.insert(0, report(args, ours, static, cpp))
    if args.workload == "chat":
        tables.append(turns_report({"ours": ours, "llama.cpp": cpp}))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
