"""Benchmark generation speed and memory: this library against HF transformers, on the same random weights.

    python benchmarks/generation.py --preset 1B --dtype bfloat16 --prompt_len 512 --decode_tokens 32 \\
        --batch_sizes 1,8 --repeats 3 --threads 2

The parent process writes a random checkpoint once (and its HF conversion), measures the machine's read bandwidth,
runs each implementation in a child process of its own (this script with `--worker`), and prints a markdown table
of prefill and decode speed, load time and peak memory. benchmarks/README.md says exactly how each figure is
measured. Nothing asserts on timings; a float32 run exits non-zero if the greedy tokens of ours and transformers
differ.

This script is the entry point; the modules beside it hold the pieces (benchmarks/README.md lists them).
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This clone's package, even where it is not installed; and the sibling modules, even where this file is not run
# as a script but loaded by its path (as a test does).
for folder in (ROOT, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_agreement import compare_greedy  # noqa: E402
from bench_args import build_parser, check_args  # noqa: E402
from bench_checkpoints import prepare_checkpoints  # noqa: E402
from bench_measure import decode_bytes_per_token, measure_read_bandwidth  # noqa: E402
from bench_report import markdown_report, write_chart  # noqa: E402
from bench_rounds import median_over_rounds, run_round  # noqa: E402
from bench_worker import worker  # noqa: E402

if TYPE_CHECKING:
    from llama.args import ModelArgs


def make_prompts(seed: int, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    """Random prompt token ids, the same for every implementation; ids below 128000, so no special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 128000), (batch, length), generator=generator).tolist()


def describe_machine(args: argparse.Namespace, model_args: "ModelArgs") -> dict[str, Any]:
    """What the report says about the model and where it ran (the bandwidth and agreement figures come later)."""
    from llama.checkpoint.layout import param_shapes

    machine: dict[str, Any] = {
        "decode_bytes_per_token": decode_bytes_per_token(args.preset, getattr(torch, args.dtype)),
        "n_params": sum(math.prod(s) for s in param_shapes(model_args).values()),
    }
    machine["where"] = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    if "transformers" in args.impl:
        import transformers

        machine["transformers_version"] = transformers.__version__
    return machine


def run_spec(args: argparse.Namespace, config: dict[str, Any], model_args: "ModelArgs", meta_dir: Path,
             hf_dir: Path) -> dict[str, Any]:
    """What every worker is told: the run's options, the checkpoints, the cache size and the prompts."""
    return {
        **config,
        "meta_dir": str(meta_dir),
        "hf_dir": str(hf_dir),
        "max_seq_len": max(max(args.prompt_len, args.decode_prompt_len) + args.decode_tokens,
                           args.quality_positions if args.quantize else 0),
        "prefill_prompt": make_prompts(args.seed, 1, args.prompt_len, model_args.vocab_size)[0],
        "decode_prompts": make_prompts(args.seed + 1, max(args.batch_sizes), args.decode_prompt_len,
                                       model_args.vocab_size),
        "quality_prompt": make_prompts(args.seed + 2, 1, args.quality_positions, model_args.vocab_size)[0],
    }


def run_rounds(args: argparse.Namespace, spec: dict[str, Any], meta_dir: Path,
               machine: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every round: the read bandwidth, then every worker. Each figure's median over the rounds, in table order."""
    script = Path(__file__).resolve()
    rounds, bandwidths = [], []
    with tempfile.TemporaryDirectory(prefix="llama3-bench-logits-") as logits_dir:
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}: measuring read bandwidth ...", flush=True)
            bandwidths.append(measure_read_bandwidth(args.bandwidth_mib, args.threads, args.device))
            rounds.append(run_round(args, spec, script, meta_dir, Path(logits_dir), machine if number == 0 else None))
    machine["bandwidth_bytes_s"] = statistics.median(bandwidths)
    results = median_over_rounds(rounds)

    # Order rows: ours, ours quantized, transformers last, so that ratios read against the bottom row.
    results = dict(sorted(results.items(), key=lambda item: item[0] == "transformers"))
    results.pop("llama.cpp", None)  # run only through llama_cpp_workers, under the GGUF type's name
    return results


def main(args: argparse.Namespace) -> int:
    """Parent process: prepare the weights, measure the machine, run the workers, report."""
    from llama.args import PRESETS, ModelArgs

    model_args = ModelArgs.from_params(PRESETS[args.preset])
    meta_dir, hf_dir = prepare_checkpoints(args.cache_dir, args.preset, args.seed, "transformers" in args.impl)
    machine = describe_machine(args, model_args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("worker", "worker_spec")}
    spec = run_spec(args, config, model_args, meta_dir, hf_dir)
    results = run_rounds(args, spec, meta_dir, machine)

    failed = False
    if "ours" in results and "transformers" in results:
        same, total = compare_greedy(results["ours"], results["transformers"])
        machine["greedy"] = {"same": same, "total": total}
        failed = args.dtype == "float32" and (same != total or total == 0)

    report = markdown_report(config, results, machine)
    print("\n" + report)
    if args.json is not None:
        args.json.write_text(json.dumps({"config": config, "machine": machine, "results": results}, indent=1))
    if args.png is not None:
        write_chart(args.png, config, results)
        print(f"\nchart written to {args.png}")
    if failed:
        print("\nFAILED: in float32 both implementations must produce the same greedy tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if arguments.worker is not None:
        worker(arguments.worker, json.loads(arguments.worker_spec.read_text()))
        sys.exit(0)
    check_args(arguments, parser)
    sys.exit(main(arguments))
