"""The generation benchmark's child process (`generation.py --worker IMPL`): it loads one implementation, warms it
up, times prefill and decoding, reads its peak memory, optionally saves logits for the quality figures and
profiles a decode, and writes its results as JSON for the parent."""

import importlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench_measure import kv_cache_bytes, peak_rss_bytes, synchronize
from bench_runners import RUNNERS, Runner


def median_time(run: Callable[[], Any], repeats: int, device: str) -> float:
    """Median wall time of `run()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_decode(runner: Runner, generate: Callable[[], Any], device: str) -> tuple[float, int, Any]:
    """Run `generate()` and return (decode-phase seconds, decode steps, its result).

    `runner.on_model_call` records when each model call returns: a prompt's prefill, or a decode step. The decode
    phase runs from the end of the last prefill (waiting for the GPU there) to the return of `generate`.
    """
    stamps: list[float] = []

    def stamp(prefill: bool) -> None:
        if prefill:  # the decode phase starts after it; steps are only counted, so that the GPU never waits
            synchronize(device)
            stamps.clear()
        stamps.append(time.perf_counter())

    remove = runner.on_model_call(stamp)
    try:
        result = generate()
        synchronize(device)
        ended = time.perf_counter()
    finally:
        remove()
    if len(stamps) < 2:
        raise RuntimeError("generate made no decode step; use --decode_tokens of at least 2")
    return ended - stamps[0], len(stamps) - 1, result


def load_runner(impl: str, spec: dict[str, Any], dtype: torch.dtype) -> tuple[Runner, float]:
    """The implementation's runner and its load time in seconds."""
    # Import the library before the clock starts: load time is that of building the model, not of imports.
    module, runner_class = RUNNERS[impl]
    importlib.import_module(module)
    started = time.perf_counter()
    runner = runner_class(spec, dtype)
    return runner, time.perf_counter() - started


def warm_up(runner: Runner, prefill_prompt: torch.Tensor, decode_prompts: list[list[int]], batches: list[int]) -> None:
    """Touch every weight page, create kernels for each shape family, at small sizes."""
    runner.prefill(prefill_prompt[:, :8], last_only=True)
    runner.prefill(prefill_prompt[:, :8], last_only=not runner.all_logits)
    for batch in batches:  # a few steps: CUDA graphs are recorded on a later call than the first
        runner.generate([p[:8] for p in decode_prompts[:batch]], 4)


def measure_prefill(impl: str, runner: Runner, prefill_prompt: torch.Tensor, spec: dict[str, Any],
                    result: dict[str, Any], last_only: bool) -> None:
    """Prefill tokens/s with last-position or (where the runner has them) all-position logits, into `result`."""
    key = "prefill_last_tok_s" if last_only else "prefill_all_tok_s"
    if not (last_only or runner.all_logits):
        result[key] = None
        return
    seconds = median_time(lambda: runner.prefill(prefill_prompt, last_only), spec["repeats"], spec["device"])
    result[key] = prefill_prompt.shape[1] / seconds
    print(f"{impl}: {key} {result[key]:.1f}", flush=True)


def measure_decode(impl: str, runner: Runner, batches: list[int], spec: dict[str, Any],
                   result: dict[str, Any]) -> None:
    """Decode tokens/s, decode steps and greedy tokens of each batch size, into `result`."""
    decode_prompts, new_tokens = spec["decode_prompts"], spec["decode_tokens"]
    for batch in batches:
        rates, steps = [], []
        for _ in range(spec["repeats"]):
            seconds, n_steps, rows = timed_decode(
                runner, lambda: runner.generate(decode_prompts[:batch], new_tokens), spec["device"])
            rates.append(batch * n_steps / seconds)
            steps.append(n_steps)
        result["decode_tok_s"][str(batch)] = statistics.median(rates)
        result["decode_steps"][str(batch)] = steps
        result["greedy"][str(batch)] = rows
        print(f"{impl}: decode batch {batch} {result['decode_tok_s'][str(batch)]:.2f} tok/s", flush=True)


def profile_decode(runner: Runner, spec: dict[str, Any]) -> None:
    """Profile one batch-1 decode with torch.profiler; write its operator tables to spec["profile"]."""
    from torch.profiler import ProfilerActivity, profile

    # Start profiling when the prompt's forward returns, so that the table holds the decode phase only.
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    started: list[bool] = []

    def start_after_prefill(prefill: bool) -> None:
        if not started:
            started.append(True)
            prof.start()

    remove = runner.on_model_call(start_after_prefill)
    try:
        runner.generate(spec["decode_prompts"][:1], spec["decode_tokens"])
    finally:
        remove()
        if started:
            prof.stop()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
    Path(spec["profile"]).write_text(table + "\n\nGrouped by input shape:\n" + shapes)
    print(f"profile written to {spec['profile']}", flush=True)


def worker(impl: str, spec: dict[str, Any]) -> None:
    """Child process: load one implementation, measure it, write its JSON result to spec["result_path"]."""
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    runner, load_s = load_runner(impl, spec, dtype)

    device = spec["device"]
    prefill_prompt = torch.tensor([spec["prefill_prompt"]], device=device)
    batches = [b for b in spec["batch_sizes"] if b <= runner.max_batch]
    warm_up(runner, prefill_prompt, spec["decode_prompts"], batches)

    result: dict[str, Any] = {"load_s": load_s, "decode_tok_s": {}, "decode_steps": {}, "greedy": {}}
    measure_prefill(impl, runner, prefill_prompt, spec, result, last_only=True)
    measure_decode(impl, runner, batches, spec, result)

    # Memory is read now: before the all-logits prompt, whose logits are output the caller asked for (512 positions
    # × Llama 3's vocabulary: 0.25 GiB in float32) rather than the model's memory, and before the extras below (the
    # profiler's records, the quality logits) add their own.
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    measure_prefill(impl, runner, prefill_prompt, spec, result, last_only=False)
    result["misaligned_weights"] = runner.misaligned_weights()
    result["weights_kv_bytes"] = runner.weights_bytes() + kv_cache_bytes(spec, dtype)
    if impl == "ours":
        result["stop_tokens"] = sorted(runner.llama.tokenizer.stop_tokens)

    if spec.get("quality_logits_path"):
        with torch.inference_mode():
            logits = runner.prefill(torch.tensor([spec["quality_prompt"]], device=device), last_only=False)[0]
        torch.save(logits.float().cpu(), spec["quality_logits_path"])

    if spec.get("profile") and impl == "ours":
        profile_decode(runner, spec)

    Path(spec["result_path"]).write_text(json.dumps(result))
