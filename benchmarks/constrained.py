"""What constrained decoding costs: decode speed and time to first token with and without a JSON schema.

    python benchmarks/constrained.py --preset 1B --dtype bfloat16 --batch_sizes 1,8 --decode_tokens 32 \\
        --prompt_len 128 --repeats 5 --threads 2

On the random checkpoint `benchmarks/generation.py` uses (written once into `--cache_dir`), in one process, the
engine runs the same greedy requests with and without a grammar (a schema of 10 fields), taking turns, `--repeats`
times, and prints a markdown table of the medians, and of the best figures (the fastest step, the quickest first
token), which other processes on a shared machine disturb least:

- decode tokens/s at each batch size: the batch size over the time of a decode step, each step timed from the end
  of the previous model call to the end of its own (picks, masks and bookkeeping included). The schema needs more
  than `--decode_tokens` tokens, so constrained batches keep every row to the end (a note says otherwise);
- time to first token at batch 1, three pairs a round: from the request's arrival to its first token, one
  `--prompt_len` prompt; the constrained request's time includes turning the schema into a grammar
  (`json_schema_grammar`) and compiling it;
- the parts that constrained decoding adds, timed alone: the schema's grammar, its matcher, one mask, the masks of
  eight sequences inside JSON strings (where the most tokens are allowed), and applying eight masks to the logits;
  and, once per vocabulary, indexing it for llguidance (the first constrained request pays it; not in the medians).

Also the CPU model (lscpu) and the machine's read bandwidth. Nothing is asserted on timings.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this clone's package, even where another copy is installed
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_checkpoints import prepare_checkpoints  # noqa: E402
from bench_measure import measure_read_bandwidth  # noqa: E402
from bench_runners import observe_engine_steps  # noqa: E402
from generation import make_prompts  # noqa: E402
from llama import Llama  # noqa: E402
from llama.engine import SamplingParams  # noqa: E402
from llama.grammar import GrammarVocabulary, json_schema_grammar, llguidance  # noqa: E402
from llama.logits_processing import apply_masks  # noqa: E402

SHORT = {"type": "string", "maxLength": 24}
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 100000},
        "first_name": SHORT,
        "last_name": SHORT,
        "email": {"type": "string", "maxLength": 48},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["id", "first_name", "last_name", "email", "age", "role", "active", "score", "tags", "address"],
    "additionalProperties": False,
}
IN_STRING = '{"id":42,"first_name":"'  # a prefix that leaves a matcher inside a JSON string


def parse_args() -> argparse.Namespace:
    from llama.args import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="1B", choices=list(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch_sizes", default="1,8", type=lambda text: [int(b) for b in text.split(",")])
    parser.add_argument("--decode_tokens", type=int, default=32, help="tokens per sequence in the decode runs")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind, taking turns")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", type=Path, default=Path.home() / ".cache" / "llama3-bench")
    return parser.parse_args()


def decode_steps(llama: Llama, prompts: list[list[int]], params: SamplingParams) -> tuple[list[float], int]:
    """The durations (s) of the decode steps of `prompts` run together, each from the end of the previous model
    call to the end of its own (the picks and bookkeeping between them included), and how many sequences finished
    before max_tokens."""
    ends: list[tuple[bool, float]] = []
    undo = observe_engine_steps(llama, lambda prefill: ends.append((prefill, time.perf_counter())))
    try:
        sequences = [llama.engine.submit(prompt, params) for prompt in prompts]
        while llama.engine.step():
            pass
    finally:
        undo()
    last_prompt = max(i for i, (prefill, _) in enumerate(ends) if prefill)
    times = [t for _, t in ends[last_prompt:]]
    return [b - a for a, b in zip(times, times[1:])], sum(s.finish_reason != "length" for s in sequences)


def first_token_seconds(llama: Llama, prompt: list[int], schema: Optional[dict]) -> float:
    started = time.perf_counter()
    grammar = json_schema_grammar(schema) if schema is not None else None
    llama.engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0, grammar=grammar))
    while llama.engine.step():
        pass
    return time.perf_counter() - started


def median_ms(run: Callable[[Any], Any], repeats: int, setup: Callable[[], Any] = lambda: None) -> float:
    """Median ms of `run(setup())`, `setup` untimed: fresh matchers each time, since llguidance caches the masks
    of states it has seen (a decode step's states are new)."""
    times = []
    for _ in range(repeats):
        prepared = setup()
        started = time.perf_counter()
        run(prepared)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def parts_ms(llama: Llama, vocabulary: GrammarVocabulary, repeats: int) -> dict[str, float]:
    """The work constrained decoding adds, each part timed alone (median ms)."""
    grammar = json_schema_grammar(SCHEMA)
    prefix = llama.tokenizer.encode(IN_STRING, bos=False, eos=False)

    def in_string() -> list[Any]:
        matchers = [vocabulary.matcher(grammar) for _ in range(8)]
        for matcher in matchers:
            matcher.consume_tokens(prefix)
        return matchers

    threads = None if llama.engine.processing.overlap else torch.get_num_threads()  # as the engine computes them
    logits = torch.randn(8, llama.model.args.vocab_size)
    masks = vocabulary.masks(in_string())
    return {
        "schema to grammar (json_schema_grammar)": median_ms(lambda _: json_schema_grammar(SCHEMA), repeats),
        "matcher (compiling the grammar)": median_ms(lambda _: vocabulary.matcher(grammar), repeats),
        "first mask, one sequence": median_ms(lambda ms: vocabulary.masks(ms, threads), repeats,
                                              lambda: [vocabulary.matcher(grammar)]),
        "masks of 8 sequences inside strings": median_ms(lambda ms: vocabulary.masks(ms, threads), repeats, in_string),
        "applying 8 masks to (8, vocab) logits": median_ms(lambda _: apply_masks(logits, masks), repeats),
    }


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 "unknown CPU")
    bandwidth = measure_read_bandwidth(1024, torch.get_num_threads(), "cpu") / 1e9
    return (f"{model}, {bandwidth:.1f} GB/s read bandwidth (torch.sum over 1 GiB), torch {torch.__version__}, "
            f"llguidance {llguidance().__version__}, {torch.get_num_threads()} threads")


def measure(llama: Llama, args: argparse.Namespace) -> dict[str, list[float]]:
    """Every timed step and first token, the kinds taking turns: decode step seconds per batch size and first-token
    milliseconds, each with and without the schema."""
    grammar = json_schema_grammar(SCHEMA)
    vocab_size = llama.model.args.vocab_size
    results: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for batch in args.batch_sizes:
            prompts = make_prompts(args.seed + repeat, batch, args.prompt_len, vocab_size)
            for name, constraint in (("free", None), ("constrained", grammar)):
                params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, grammar=constraint)
                steps, early = decode_steps(llama, prompts, params)
                results.setdefault(f"{name} {batch}", []).extend(steps)
                if early:
                    print(f"note: {early} {name} sequence(s) of batch {batch} finished before max_tokens")
        for pair in range(3):
            prompt = make_prompts(args.seed + 1000 + 3 * repeat + pair, 1, args.prompt_len, vocab_size)[0]
            for name, schema in (("free", None), ("constrained", SCHEMA)):
                results.setdefault(f"{name} first", []).append(first_token_seconds(llama, prompt, schema) * 1e3)
    return results


def report(results: dict[str, list[float]], batches: list[int], parts: dict[str, float], index_s: float) -> str:
    """Decode tok/s from the median step (batch / median step time) and the median first token; and the same
    from the fastest step and first token, which a busy machine disturbs least."""
    lines = ["| | " + " | ".join(f"decode batch {b} tok/s" for b in batches) + " | first token ms |",
             "|---" * (len(batches) + 2) + "|"]
    for label, pick in (("median", statistics.median), ("best", min)):
        value = {key: pick(values) for key, values in results.items()}
        speed = {name: [b / value[f"{name} {b}"] for b in batches] for name in ("free", "constrained")}
        for name in ("free", "constrained"):
            cells = [f"{v:.2f}" for v in speed[name]] + [f"{value[f'{name} first']:.1f}"]
            lines.append(f"| {name} ({label}) | " + " | ".join(cells) + " |")
        ratios = [f"{100 * c / f:.1f} %" for c, f in zip(speed["constrained"], speed["free"])]
        added = value["constrained first"] - value["free first"]
        lines.append(f"| constrained / free ({label}) | " + " | ".join(ratios) + f" | {added:+.1f} ms |")
    counts = ", ".join(f"{key}: {len(values)}" for key, values in results.items())
    lines += ["", f"Samples (decode steps, first tokens): {counts}", ""]
    lines += ["| part | ms |", "|---|---|"] + [f"| {name} | {ms:.3f} |" for name, ms in parts.items()]
    lines.append(f"| indexing the vocabulary for llguidance (once per process) | {index_s * 1e3:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    meta_dir, _ = prepare_checkpoints(args.cache_dir, args.preset, args.seed, with_hf=False)
    llama = Llama.build(meta_dir, device="cpu", dtype=args.dtype, max_batch_size=max(args.batch_sizes),
                        max_seq_len=args.prompt_len + args.decode_tokens + 8)
    started = time.perf_counter()
    vocabulary = GrammarVocabulary(llama.tokenizer)
    index_s = time.perf_counter() - started
    llama.engine.processing.vocabulary()  # the engine's own (cached) index, built before the timed runs
    warm = make_prompts(args.seed, 1, args.prompt_len, llama.model.args.vocab_size)
    for grammar in (None, json_schema_grammar(SCHEMA)):
        decode_steps(llama, warm, SamplingParams(max_tokens=4, temperature=0, grammar=grammar))
    results = measure(llama, args)
    print(report(results, args.batch_sizes, parts_ms(llama, vocabulary, 20), index_s))
    where = ("in a background thread while the forward pass runs" if llama.engine.processing.overlap else
             f"before the forward pass, on {torch.get_num_threads()} threads (a CPU forward pass fills every core)")
    print(f"\n{args.preset} preset, {args.dtype}, prompts of {args.prompt_len} random tokens, {args.decode_tokens} "
          f"greedy tokens, {args.repeats} rounds; masks computed {where}; schema: {json.dumps(SCHEMA)}\n{machine()}")


if __name__ == "__main__":
    main()
