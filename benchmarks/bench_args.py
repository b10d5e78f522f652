"""The command line of benchmarks/generation.py: its options, their parsers, and the checks of combinations that
cannot work (made before anything slow happens)."""

import argparse
import importlib.util
import math
from pathlib import Path

import torch

IMPLEMENTATIONS = ("ours", "transformers", "llama.cpp")
QUANTIZATIONS = ("int8", "int4")


def positive_int_list(text: str) -> list[int]:
    """Parse "1,8" into [1, 8]; every entry must be a positive integer."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def positive_float_list(text: str) -> list[float]:
    """Parse "0.5,2" into [0.5, 2.0]; every entry must be a positive finite number."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """Parse a positive integer for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def impl_list(text: str) -> list[str]:
    """Parse "ours,transformers"; names must be known and not repeated."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(IMPLEMENTATIONS)} without repeats, got {text!r}"
        )
    return names


def quantization_list(text: str) -> list[str]:
    """Parse "int8,int4"; names must be known and not repeated."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or not set(names) <= set(QUANTIZATIONS) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(QUANTIZATIONS)} without repeats, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line (the hidden --worker options are for the child processes)."""
    from llama.args import PRESETS

    parser = argparse.ArgumentParser(
        description="Measure prefill/decode speed, load time and peak memory of this library and of HF "
        "transformers on the same random-weight checkpoint, and print a markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="1B", choices=list(PRESETS), help="model shape (llama.args presets)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype both implementations compute in; float32 also requires identical greedy tokens")
    parser.add_argument("--prompt_len", type=positive_int, default=512, help="prompt length for prefill")
    parser.add_argument("--decode_prompt_len", type=positive_int, default=128,
                        help="prompt length before decoding (decode speed barely depends on it; shorter is faster to run)")
    parser.add_argument("--decode_tokens", type=positive_int, default=32, help="new tokens per decode run")
    parser.add_argument("--batch_sizes", type=positive_int_list, default=[1, 8], help="decode batch sizes, e.g. 1,8")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="run every worker this many times, in alternation; report medians over the rounds")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads in each worker")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both implementations run")
    parser.add_argument("--compile", action="store_true",
                        help='also run ours built with compile=True (the first decode step of each batch size '
                             'compiles, during the warm-up)')
    parser.add_argument("--impl", type=impl_list, default=["ours", "transformers"],
                        help="implementations to run (llama.cpp: llama-cpp-python on a GGUF of the same weights)")
    parser.add_argument("--quantize", type=quantization_list, default=[],
                        help="also run ours quantized (Llama.build(..., quantize=...)), once per quantization in "
                             "this list (int8,int4), and measure each one's quality loss")
    parser.add_argument("--quality_positions", type=positive_int, default=256,
                        help="positions compared for the quantized model's top-1 agreement and KL")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    parser.add_argument("--bandwidth_mib", type=positive_int, default=1024, help="buffer size of the bandwidth test")
    parser.add_argument("--cache_dir", type=Path, default=Path("~/.cache/llama3-bench").expanduser(),
                        help="where random checkpoints (Meta and HF layouts) are kept between runs")
    parser.add_argument("--png", type=Path, default=None, help="also write a bar chart here (needs matplotlib)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here as JSON")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile one batch-1 decode of ours with torch.profiler; write the op table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_spec", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse combinations that cannot work, before anything slow happens."""
    if args.decode_tokens < 2:
        parser.error("--decode_tokens must be at least 2: the first new token comes from the prompt's forward, "
                     "so fewer leaves no decode step to time")
    if args.png is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--png needs matplotlib, which is not installed: `pip install matplotlib`, or drop --png")
    if "llama.cpp" in args.impl and not all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf")):
        parser.error('--impl llama.cpp needs llama-cpp-python and gguf: pip install llama-cpp-python gguf')
    if "llama.cpp" in args.impl and args.device != "cpu":
        parser.error("--impl llama.cpp runs on the CPU only here; drop it or use --device cpu")
    if "transformers" in args.impl and importlib.util.find_spec("transformers") is None:
        parser.error("transformers is not installed: `pip install transformers safetensors`, or pass --impl ours")
    if args.quantize and "ours" not in args.impl:
        parser.error("--quantize applies to ours; include ours in --impl")
    if args.profile is not None and "ours" not in args.impl:
        parser.error("--profile profiles ours; include ours in --impl")
    if args.compile and "ours" not in args.impl:
        parser.error("--compile applies to ours; include ours in --impl")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA GPU; use --device cpu")
