"""Benchmark serving: concurrent streaming clients against `python -m llama.serve`, beside the library's static
`Llama.generate` at the same batch size and llama-cpp-python's OpenAI server on the same weights.

    python benchmarks/serve.py --preset 1B --dtype bfloat16 --clients 1,4,8,16 --prompt_words 96 --max_tokens 64

For each number of clients N, N clients each send one streamed `/v1/completions` request at the same moment
(greedy, a prompt of random words, `max_tokens` new tokens) and time every chunk as it arrives:
- total tok/s: the tokens all clients received (from each reply's usage, else one per chunk) / wall time from the
  first request to the last reply's end, prefill included;
- TTFT: request sent → first text chunk, p50 and p95 over clients;
- inter-token latency: the gaps between consecutive text chunks, p50 and p95 over all gaps of all clients.
The static figure is `Llama.generate` on the same N prompts (tokenized as the server does) in one batch, timed
from call to return the same way (prefill included), in its own process. llama-cpp-python (optional: `pip install
"llama-cpp-python[server]"`, built from source) serves a GGUF written from the same checkpoint
(`benchmarks/gguf_export.py`, F16 for bfloat16/float16, F32 for float32). Its server runs one request at a time
(told to queue the others rather than interrupt the running one).
Every server and the static run get `--threads` threads and run alone. Each figure is the run with the median
total tok/s of `--repeats` runs (the same server process serves them all). Timings are only printed.
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
from bench_args import positive_int, positive_int_list  # noqa: E402
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


async def one_client(client: httpx.AsyncClient, url: str, body: dict) -> dict[str, Any]:
    sent, arrivals, tokens = time.perf_counter(), [], None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals),
            "done": time.perf_counter()}


async def run_clients(port: int, model: str, texts: list[str], max_tokens: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    bodies = [{"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}} for text in texts]
    async with httpx.AsyncClient(timeout=None) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, body) for body in bodies))
    ended = max(r["done"] for r in results)
    ttft = [r["arrivals"][0] - r["sent"] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    return {"tok_s": sum(r["tokens"] for r in results) / (ended - started), **percentiles("ttft", ttft),
            **percentiles("itl", gaps)}


def percentiles(name: str, values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {f"{name}_p50": values[0] if values else float("nan"), f"{name}_p95": float("nan")}
    cuts = statistics.quantiles(values, n=20)
    return {f"{name}_p50": statistics.median(values), f"{name}_p95": cuts[18]}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median total tok/s (the lower middle one of an even number)."""
    return sorted(runs, key=lambda run: run["tok_s"])[(len(runs) - 1) // 2]


def serve_and_measure(command: list[str], args: argparse.Namespace, model: str | None) -> dict[int, dict]:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"llama3-bench-server-{port}.log"
    process = start_server([*command, "--port", str(port)], port, args.threads, log)
    try:
        model = model or httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        asyncio.run(run_clients(port, model, prompts(1, 8, seed=99), 4))  # warm-up
        return {n: median_run([asyncio.run(run_clients(port, model, prompts(n, args.prompt_words), args.max_tokens))
                               for _ in range(args.repeats)]) for n in args.clients}
    finally:
        process.terminate()
        process.wait(timeout=60)


STATIC = """
import json, sys, time, torch
from llama import Llama
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
llama = Llama.build(spec["ckpt"], max_seq_len=spec["max_seq_len"], max_batch_size=max(spec["clients"]),
                    device="cpu", dtype=spec["dtype"])
encode = lambda text: llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos, eos=False)
llama.generate([encode("warm up")], 4, temperature=0)
rates = {}
for n, texts in zip(spec["clients"], spec["texts"]):
    runs = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        tokens, _ = llama.generate([encode(t) for t in texts], spec["max_tokens"], temperature=0)
        runs.append(sum(map(len, tokens)) / (time.perf_counter() - started))
    rates[n] = sorted(runs)[(len(runs) - 1) // 2]
print(json.dumps(rates))
"""


def static_generate(meta_dir: Path, args: argparse.Namespace) -> dict[int, float]:
    spec = {"ckpt": str(meta_dir), "threads": args.threads, "clients": args.clients, "dtype": args.dtype,
            "max_tokens": args.max_tokens, "max_seq_len": args.max_seq_len, "repeats": args.repeats,
            "texts": [prompts(n, args.prompt_words) for n in args.clients]}
    done = subprocess.run([sys.executable, "-c", STATIC, json.dumps(spec)], capture_output=True, text=True,
                          check=True, env=dict(checkout_env(), OMP_NUM_THREADS=str(args.threads)))
    return {int(n): rate for n, rate in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def llama_cpp_server(meta_dir: Path, args: argparse.Namespace) -> dict[int, dict] | None:
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
    return serve_and_measure(command, args, model="llama.cpp")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1B")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--clients", type=positive_int_list, default=[1, 4, 8, 16])
    parser.add_argument("--prompt_words", type=positive_int, default=96)
    parser.add_argument("--max_tokens", type=positive_int, default=64)
    parser.add_argument("--max_seq_len", type=positive_int, default=1024)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per figure; the median is shown")
    parser.add_argument("--impls", default="ours,static,llama.cpp", help="which of ours, static, llama.cpp to run")
    parser.add_argument("--cache_dir", type=Path, default=Path.home() / ".cache" / "llama3-bench")
    args = parser.parse_args()
    meta_dir, _ = prepare_checkpoints(args.cache_dir, args.preset, 0, with_hf=False)
    impls = args.impls.split(",")
    ours_command = [sys.executable, "-m", "llama.serve", "--ckpt_dir", str(meta_dir), "--max_batch_size",
                    str(max(args.clients)), "--max_seq_len", str(args.max_seq_len), "--dtype", args.dtype]
    ours = serve_and_measure(ours_command, args, model=None) if "ours" in impls else None
    static = static_generate(meta_dir, args) if "static" in impls else None
    cpp = llama_cpp_server(meta_dir, args) if "llama.cpp" in impls else None
    print(json.dumps({"ours": ours, "static": static, "llama.cpp": cpp}))
    if ours and static:
        print(report(args, ours, static, cpp))


if __name__ == "__main__":
    main()
