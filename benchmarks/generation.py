"""Benchmark generation speed and memory: this library against HF transformers, on the same random weights.

    python benchmarks/generation.py --preset 1B --dtype bfloat16 --prompt_len 512 --decode_tokens 32 \\
        --batch_sizes 1,8 --repeats 3 --threads 2

The parent process writes a random checkpoint once (and its HF conversion), measures the machine's read bandwidth,
runs each implementation in a child process of its own (this script with `--worker`), and prints a markdown table
of prefill and decode speed, load time and peak memory. benchmarks/README.md says exactly how each figure is
measured. Nothing asserts on timings; a float32 run exits non-zero if the greedy tokens of ours and transformers
differ.
"""

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a clone, without installing the package
    sys.path.insert(0, str(ROOT))

IMPLEMENTATIONS = ("ours", "transformers", "llama.cpp")
QUANTIZATIONS = ("int8",)
GIB = 1024**3
CHECKPOINT_DTYPE = torch.bfloat16  # how the random checkpoint is stored, whatever dtype a run computes in


# --------------------------------------------------------------------------------------------------------------
# Command line


def positive_int_list(text: str) -> list[int]:
    """Parse "1,8" into [1, 8]; every entry must be a positive integer."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
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
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="also run ours quantized (Llama.build(..., quantize=...)) and measure its quality loss")
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
    if args.quantize is not None and "ours" not in args.impl:
        parser.error("--quantize applies to ours; include ours in --impl")
    if args.profile is not None and "ours" not in args.impl:
        parser.error("--profile profiles ours; include ours in --impl")
    if args.compile and "ours" not in args.impl:
        parser.error("--compile applies to ours; include ours in --impl")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA GPU; use --device cpu")


# --------------------------------------------------------------------------------------------------------------
# Parent: checkpoints, bandwidth, workers, report


def prepare_checkpoints(cache_dir: Path, preset: str, seed: int, with_hf: bool) -> tuple[Path, Path]:
    """The Meta checkpoint and (`with_hf`) its HF conversion for (preset, seed), written on first use, then reused.

    A `complete` marker is written last, so an interrupted run is redone rather than reused half-written.
    """
    from llama.args import ModelArgs
    from llama.checkpoint.hf import meta_to_hf_state_dict
    from llama.checkpoint.hf_config import hf_config_dict
    from llama.checkpoint.load import load_shard, read_params
    from llama.checkpoint.random_weights import write_random_checkpoint

    base = cache_dir / f"{preset}-seed{seed}"
    meta_dir, hf_dir = base / "meta", base / "hf"
    if not (meta_dir / "complete").is_file():
        print(f"writing a random {preset} checkpoint to {meta_dir} ...", flush=True)
        write_random_checkpoint(meta_dir, preset, 1, seed, CHECKPOINT_DTYPE)
        if not (meta_dir / "tokenizer.model").is_file():
            raise RuntimeError("the checkpoint needs the Llama 3 tokenizer from `pip install llama-models`")
        (meta_dir / "complete").touch()
    if with_hf and not (hf_dir / "complete").is_file():
        print(f"converting it to an HF folder in {hf_dir} ...", flush=True)
        hf_dir.mkdir(parents=True, exist_ok=True)
        args = ModelArgs.from_params(read_params(meta_dir))
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_config_dict(args)}
        (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state_dict = meta_to_hf_state_dict(load_shard(meta_dir / "consolidated.00.pth"), args)
        write_aligned_safetensors(state_dict, hf_dir / "model.safetensors")
        del state_dict
        (hf_dir / "complete").touch()
    return meta_dir, hf_dir


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ALIGNMENT = 64  # bytes; what torch's own checkpoint format gives every tensor


def write_aligned_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file whose data section starts at a multiple of ALIGNMENT bytes in the file.

    transformers memory-maps safetensors weights and computes with them in place when the dtype matches. The
    format only pads its header to 8 bytes, so which alignment a file's tensors get depends on its header length,
    i.e. on chance, and misaligned weights make matmuls slower (benchmarks/README.md has the measurement). Padding
    the header (the format allows trailing spaces) makes transformers' figures reproducible and comparable with
    ours, whose checkpoint format aligns tensors to 64 bytes. The format wants tensors back to back, so each tensor
    is aligned too only if those before it have sizes that are multiples of ALIGNMENT, as every preset's do; the
    workers report any weight that still ends up misaligned. Tensors are streamed to the file one at a time, so no
    second copy of the model is held in memory.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype} (supported: {list(SAFETENSORS_DTYPES)})")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGNMENT)  # the data section then starts aligned as well
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            file.write(tensor.contiguous().view(torch.uint8).numpy().data)


def measure_read_bandwidth(mib: int, threads: int, device: str, repeats: int = 5) -> float:
    """Best observed read bandwidth in bytes/s: summing a `mib` MiB float32 buffer (with `threads` CPU threads).

    The best rather than the median, because it estimates what the memory system can do; other processes on
    the machine can only make a run slower.
    """
    torch.set_num_threads(threads)
    buffer = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32, device=device)  # ones: pages must exist
    buffer.sum()  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        buffer.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * buffer.element_size() / best


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a host clock read afterwards covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


def decode_bytes_per_token(preset: str, dtype: torch.dtype) -> int:
    """Bytes of weights a decode step reads: all of them but the embedding table, in `dtype`."""
    from llama.args import PRESETS, ModelArgs
    from llama.layout import param_shapes

    shapes = param_shapes(ModelArgs.from_params(PRESETS[preset]))
    numel = sum(math.prod(shape) for key, shape in shapes.items() if key != "tok_embeddings.weight")
    return numel * dtype.itemsize


def make_prompts(seed: int, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    """Random prompt token ids, the same for every implementation; ids below 128000, so no special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 128000), (batch, length), generator=generator).tolist()


def run_worker(impl: str, spec: dict[str, Any], script: Path) -> dict[str, Any]:
    """Run one implementation in a fresh Python process and return the JSON it reports."""
    with tempfile.TemporaryDirectory(prefix="llama3-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        print(f"--- {impl} ---", flush=True)
        completed = subprocess.run([sys.executable, str(script), "--worker", impl, "--worker_spec", str(spec_path)],
                                   env=env)
        if completed.returncode != 0:
            raise RuntimeError(f"the {impl} worker failed with exit status {completed.returncode} (see its output above)")
        return json.loads(result_path.read_text())


def compare_greedy(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[int, int]:
    """(positions where both picked the same token, positions compared), over every batch size's rows.

    Ours returns a row without its stop token and ends it there; transformers never stops, so its rows are
    compared up to our length, and where ours stopped early transformers must have picked a stop token.
    """
    same = total = 0
    stop_tokens = set(ours["stop_tokens"])
    for batch, our_rows in ours["greedy"].items():
        for our_row, their_row in zip(our_rows, theirs["greedy"][batch]):
            n = len(our_row)
            total += n
            same += sum(a == b for a, b in zip(our_row, their_row))
            if n < len(their_row):  # ours stopped: the next token must have been a stop token
                total += 1
                same += their_row[n] in stop_tokens
    return same, total


def quality_loss(reference_path: Path, quantized_path: Path) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference || quantized) between two saved (positions, vocab) logit tensors."""
    reference = torch.load(reference_path).float()
    quantized = torch.load(quantized_path).float()
    top1 = (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(quantized, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return {"top1_agreement": top1, "kl": kl, "positions": reference.shape[0]}


def float32_logits(meta_dir: Path, prompt: list[int], device: str) -> torch.Tensor:
    """Logits (positions, vocab) of ours in float32 over `prompt`: the reference for the run dtype's rounding."""
    from llama.generation import Llama

    llama = Llama.build(meta_dir, max_seq_len=len(prompt), max_batch_size=1, device=device, dtype=torch.float32)
    with torch.inference_mode():
        return llama.model(torch.tensor([prompt], device=device), 0)[0].cpu()


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the table, or a dash when it was not measured."""
    return "–" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    """a / b as "1.23×", or a dash."""
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def markdown_report(config: dict[str, Any], results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    """The markdown table (one row per implementation, plus ratios to transformers) and the notes under it."""
    batches = config["batch_sizes"]
    p = config["prompt_len"]
    header = ["", "load s", f"prefill {p} tok/s (last logits)", f"prefill {p} tok/s (all logits)"]
    header += [f"decode batch {b} tok/s" + (" (total)" if b > 1 else "") for b in batches]
    memory = "peak GPU memory" if config["device"] == "cuda" else "peak RSS"
    header += [f"{memory} GiB", "weights + KV GiB", f"{memory} / (weights + KV)"]

    def metrics(result: dict[str, Any]) -> list[float | None]:
        return ([result["load_s"], result["prefill_last_tok_s"], result["prefill_all_tok_s"]]
                + [result["decode_tok_s"].get(str(b)) for b in batches]
                + [result["peak_bytes"] / GIB, result["weights_kv_bytes"] / GIB,
                   result["peak_bytes"] / result["weights_kv_bytes"]])

    digits = [2, 1, 1] + [2] * len(batches) + [2, 2, 2]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(v, d) for v, d in zip(metrics(result), digits)) + " |")
    baseline = results.get("transformers")
    if baseline is not None:
        for name, result in results.items():
            if name == "transformers":
                continue
            # Ratio > 1 is better for speeds; for load time and memory a ratio > 1 means ours takes more.
            cells = [ratio(a, b) for a, b in zip(metrics(result), metrics(baseline))]
            cells[-1] = "–"
            lines.append(f"| {name} / transformers | " + " | ".join(cells) + " |")

    limit = machine["bandwidth_bytes_s"] / machine["decode_bytes_per_token"]
    notes = [
        "",
        f"Read bandwidth {machine['bandwidth_bytes_s'] / 1e9:.1f} GB/s; a decode step reads "
        f"{machine['decode_bytes_per_token'] / 1e9:.2f} GB of {config['dtype']} weights (all but the embedding), "
        f"so batch-1 decode is limited to about {limit:.1f} tok/s.",
    ]
    for name, result in results.items():
        batch1 = result["decode_tok_s"].get("1")
        if batch1 is not None:
            notes.append(f"- {name}: batch-1 decode at {100 * batch1 / limit:.0f} % of that limit.")
    for name, result in results.items():
        if result.get("misaligned_weights"):
            notes.append(f"- warning: {result['misaligned_weights']} of {name}'s weights are not {ALIGNMENT}-byte "
                         "aligned in memory, which can make its matmuls slower.")
    greedy = machine.get("greedy")
    if greedy is not None:
        same, total = greedy["same"], greedy["total"]
        notes.append(f"\nGreedy tokens, ours vs transformers: {same}/{total} identical"
                     + (" (float32: required to be all)" if config["dtype"] == "float32" else
                        f" ({config['dtype']}: rounding may flip near-ties, so reported only)") + ".")
    quality = machine.get("quality")
    if quality is not None:
        notes.append(f"Quantized ({config['quantize']}) vs unquantized ours over {quality['positions']} positions: "
                     f"top-1 agreement {100 * quality['top1_agreement']:.1f} %, mean KL {quality['kl']:.4f} nats.")
    rounding = machine.get("rounding_quality")
    if rounding is not None:
        notes.append(f"For scale, ours in {config['dtype']} vs ours in float32 (same weights, same positions): top-1 "
                     f"agreement {100 * rounding['top1_agreement']:.1f} %, mean KL {rounding['kl']:.4f} nats.")
    notes.append(f"\nRatios above 1× favour ours for speeds; for load time and {memory}, below 1× does.")
    rounds = f" in each of {config['rounds']} rounds, then the median over the rounds" if config["rounds"] > 1 else ""
    notes.append(f"\n{config['preset']} preset ({machine['n_params'] / 1e9:.2f} B parameters, random weights), "
                 f"{config['dtype']}, {machine['where']}, prompt {p} tokens for prefill and "
                 f"{config['decode_prompt_len']} before decoding {config['decode_tokens']} tokens, median of "
                 f"{config['repeats']}{rounds}; {date.today().isoformat()}, torch {torch.__version__}, "
                 f"transformers {machine.get('transformers_version', '–')}.")
    return "\n".join(lines + notes)


def write_chart(path: Path, config: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """A grouped bar chart of the throughput figures (tokens/s), one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels = [f"prefill {config['prompt_len']}\n(last logits)"]
    labels += [f"decode\nbatch {b}" for b in config["batch_sizes"]]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(labels), 4))
    for index, (name, result) in enumerate(results.items()):
        values = [result["prefill_last_tok_s"]] + [result["decode_tok_s"][str(b)] for b in config["batch_sizes"]]
        positions = [i + (index - (len(results) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(positions, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")  # prefill and decode differ by two orders of magnitude
    ax.set_ylabel("tokens/s (log scale)")
    ax.set_title(f"{config['preset']} {config['dtype']}, {config['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_round(args: argparse.Namespace, spec: dict[str, Any], script: Path, meta_dir: Path, logits_dir: Path,
              machine: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every worker once, in the order of the table. With `machine` (the first round), also the quality figures."""
    results: dict[str, dict[str, Any]] = {}
    quality = machine is not None and args.quantize is not None
    profile = spec["profile"] if machine is not None else None  # the first round's profile is enough
    for impl in [name for name in args.impl if name != "llama.cpp"]:
        # Only ours unquantized needs to keep logits: the quantized model's quality is measured against it.
        quality_path = str(logits_dir / "ours.pt") if quality and impl == "ours" else None
        results[impl] = run_worker(impl, {**spec, "quantize": None, "compile": False, "profile": profile,
                                          "quality_logits_path": quality_path}, script)
    if args.quantize is not None:
        quantized_path = logits_dir / "quantized.pt"
        results[f"ours {args.quantize}"] = run_worker(
            "ours", {**spec, "quantize": args.quantize, "compile": False, "profile": None,
                     "quality_logits_path": str(quantized_path) if quality else None}, script)
        if quality:
            machine["quality"] = quality_loss(logits_dir / "ours.pt", quantized_path)
            if args.dtype != "float32":
                # For scale: how often mere rounding to the run's dtype flips the top token of these weights.
                float32_path = logits_dir / "float32.pt"
                torch.save(float32_logits(meta_dir, spec["quality_prompt"], args.device), float32_path)
                machine["rounding_quality"] = quality_loss(float32_path, logits_dir / "ours.pt")
    if "llama.cpp" in args.impl:
        results.update(llama_cpp_workers(meta_dir, args, spec, script))
    if args.compile:
        results["ours compiled"] = run_worker("ours", {**spec, "quantize": None, "compile": True, "profile": None,
                                                       "quality_logits_path": None}, script)
    return results


def median_over_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The first round's results, with each timing and memory figure replaced by its median over the rounds."""
    results = {}
    for name, first in rounds[0].items():
        merged = dict(first)
        for key in ("load_s", "prefill_last_tok_s", "prefill_all_tok_s", "peak_bytes"):
            values = [r[name][key] for r in rounds if r[name].get(key) is not None]
            if values:
                merged[key] = statistics.median(values)
        merged["decode_tok_s"] = {batch: statistics.median(r[name]["decode_tok_s"][batch] for r in rounds)
                                  for batch in first["decode_tok_s"]}
        results[name] = merged
    return results


def main(args: argparse.Namespace) -> int:
    """Parent process: prepare the weights, measure the machine, run the workers, report."""
    from llama.args import PRESETS, ModelArgs
    from llama.layout import param_shapes

    dtype = getattr(torch, args.dtype)
    model_args = ModelArgs.from_params(PRESETS[args.preset])
    meta_dir, hf_dir = prepare_checkpoints(args.cache_dir, args.preset, args.seed, "transformers" in args.impl)

    machine: dict[str, Any] = {
        "decode_bytes_per_token": decode_bytes_per_token(args.preset, dtype),
        "n_params": sum(math.prod(s) for s in param_shapes(model_args).values()),
    }
    machine["where"] = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    if "transformers" in args.impl:
        import transformers

        machine["transformers_version"] = transformers.__version__

    max_batch = max(args.batch_sizes)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("worker", "worker_spec")}
    spec = {
        **config,
        "meta_dir": str(meta_dir),
        "hf_dir": str(hf_dir),
        "max_seq_len": max(max(args.prompt_len, args.decode_prompt_len) + args.decode_tokens,
                           args.quality_positions if args.quantize else 0),
        "prefill_prompt": make_prompts(args.seed, 1, args.prompt_len, model_args.vocab_size)[0],
        "decode_prompts": make_prompts(args.seed + 1, max_batch, args.decode_prompt_len, model_args.vocab_size),
        "quality_prompt": make_prompts(args.seed + 2, 1, args.quality_positions, model_args.vocab_size)[0],
    }
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


# --------------------------------------------------------------------------------------------------------------
# Workers (child processes): one implementation each


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; benchmarks/README.md says why not ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss is in bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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


def timed_decode(runner: "Runner", generate: Callable[[], Any], device: str) -> tuple[float, int, Any]:
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


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, counting shared storage once, and of the oneDNN-packed weights
    that `PackedLinear`s hold outside them (their meta `weight` records the size)."""
    from llama.kernels import PackedLinear

    total = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, PackedLinear))
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def kv_cache_bytes(spec: dict[str, Any], dtype: torch.dtype) -> int:
    """Keys and values of every layer for the largest batch at max_seq_len (what ours preallocates)."""
    from llama.args import PRESETS, ModelArgs

    args = ModelArgs.from_params(PRESETS[spec["preset"]])
    per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize
    return per_position * max(spec["batch_sizes"]) * spec["max_seq_len"]


def first_call_is_prefill(callback: Callable[[bool], None]) -> Callable[..., None]:
    """A model-call callback for `Runner.on_model_call` where the first call is the prompt's forward and every
    later one a decode step."""
    calls: list[None] = []

    def call(*_: Any) -> None:
        callback(not calls)
        calls.append(None)

    return call


class Runner:
    """What a worker needs from one implementation: prefill, greedy generate, and the model to hook."""

    model: torch.nn.Module
    max_batch = 1 << 30  # the largest decode batch it runs
    all_logits = True  # whether it can return every position's logits

    def prefill(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Logits of a forward over `tokens` (1, n) placed at position 0, filling the KV cache."""
        raise NotImplementedError

    def weights_bytes(self) -> int:
        return model_bytes(self.model)

    def misaligned_weights(self) -> int:
        return sum(t.data_ptr() % ALIGNMENT != 0 for t in self.model.parameters())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (new tokens only)."""
        raise NotImplementedError

    def on_model_call(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call `callback(prefill)` each time a model call returns (prefill: whether it was a prompt's forward);
        returns what stops that. Here the first call is the prompt's forward, every later one a decode step."""
        return self.model.register_forward_hook(first_call_is_prefill(callback)).remove


class OursRunner(Runner):
    """This library: `Llama.build` and `Llama.generate`."""

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype) -> None:
        from llama.generation import Llama

        extra = {"quantize": spec["quantize"]} if spec["quantize"] else {}
        if spec.get("compile"):
            extra["compile"] = True
        self.llama = Llama.build(spec["meta_dir"], max_seq_len=spec["max_seq_len"],
                                 max_batch_size=max(spec["batch_sizes"]), device=spec["device"], dtype=dtype, **extra)
        self.model = self.llama.model

    def prefill(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        return self.model(tokens, 0, last_logits_only=last_only)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return self.llama.generate(prompts, new_tokens, temperature=0)[0]

    def on_model_call(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        # `Llama.forward`, not the model: compiled decode steps run the model's graph without calling its forward.
        forward = self.llama.forward

        def forward_and_call_back(tokens: torch.Tensor, start_pos: Any, **kwargs: Any) -> torch.Tensor:
            logits = forward(tokens, start_pos, **kwargs)
            callback(not isinstance(start_pos, torch.Tensor))  # decode steps give each row its position
            return logits

        self.llama.forward = forward_and_call_back
        return lambda: setattr(self.llama, "forward", forward)


class TransformersRunner(Runner):
    """HF transformers' `LlamaForCausalLM` with sdpa attention and its default (dynamic) cache."""

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        # device_map loads straight onto the GPU (it needs accelerate); on the CPU the weights stay memory-mapped.
        placement = {"device_map": spec["device"]} if spec["device"] != "cpu" else {}
        self.model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype, attn_implementation="sdpa",
                                                      **placement).eval()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        # logits_to_keep=0 means all positions in transformers.
        return self.model(tokens, use_cache=True, logits_to_keep=1 if last_only else 0).logits

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        input_ids = torch.tensor(prompts, device=self.model.device)
        # eos_token_id=None: never stop early, so exactly new_tokens tokens (and no logits are altered, unlike
        # min_new_tokens, which would mask end-of-sequence tokens and could change the greedy choice).
        output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return output[:, input_ids.shape[1]:].tolist()


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python: a GGUF of the same weights, its own greedy `generate` loop, one
    sequence at a time (its Python API has no batched decoding), last-position logits only."""

    max_batch = 1
    all_logits = False

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype) -> None:
        from llama_cpp import Llama as LlamaCpp

        self.gguf = Path(spec["gguf"])
        self.llm = LlamaCpp(str(self.gguf), n_ctx=spec["max_seq_len"], n_batch=min(spec["max_seq_len"], 512),
                            n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)
        self.model = None

    def prefill(self, tokens: torch.Tensor, last_only: bool) -> None:
        self.llm.reset()
        self.llm.eval(tokens[0].tolist())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        rows = []
        for prompt in prompts:
            tokens = []
            self.llm.reset()  # no reuse of the previous run's prompt: every run prefills its prompt in full
            for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            rows.append(tokens)
        return rows

    def on_model_call(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        # Rows run one after another, each with its own prompt's eval; only the first counts as the prefill.
        evaluate, called_back = self.llm.eval, first_call_is_prefill(callback)

        def evaluate_and_call_back(tokens: Any) -> None:
            evaluate(tokens)
            called_back()

        self.llm.eval = evaluate_and_call_back
        return lambda: delattr(self.llm, "eval")

    def weights_bytes(self) -> int:
        return self.gguf.stat().st_size

    def misaligned_weights(self) -> int:
        return 0


def llama_cpp_workers(meta_dir: Path, args: argparse.Namespace, spec: dict[str, Any],
                      script: Path) -> dict[str, dict[str, Any]]:
    """llama.cpp on GGUF files written from the benchmark's checkpoint: F16 (F32 for a float32 run), and Q8_0 with
    --quantize int8, each written once into the checkpoint's cache folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_export import export_gguf

    types = ["F32" if args.dtype == "float32" else "F16"] + (["Q8_0"] if args.quantize == "int8" else [])
    results = {}
    for tensor_type in types:
        path = meta_dir.parent / f"model-{tensor_type}.gguf"
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            export_gguf(meta_dir, path.with_suffix(".partial"), tensor_type).rename(path)
        results[f"llama.cpp {tensor_type}"] = run_worker(
            "llama.cpp", {**spec, "gguf": str(path), "quantize": None, "compile": False, "profile": None,
                          "quality_logits_path": None}, script)
    return results


def worker(impl: str, spec: dict[str, Any]) -> None:
    """Child process: load one implementation, measure it, write its JSON result to spec["result_path"]."""
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    # Import the library before the clock starts: load time is that of building the model, not of imports.
    runners = {"ours": ("llama.generation", OursRunner), "transformers": ("transformers.models.llama", TransformersRunner),
               "llama.cpp": ("llama_cpp", LlamaCppRunner)}
    module, runner_class = runners[impl]
    importlib.import_module(module)
    started = time.perf_counter()
    runner: Runner = runner_class(spec, dtype)
    load_s = time.perf_counter() - started

    device = spec["device"]
    prefill_prompt = torch.tensor([spec["prefill_prompt"]], device=device)
    decode_prompts = spec["decode_prompts"]
    batches, new_tokens, repeats = spec["batch_sizes"], spec["decode_tokens"], spec["repeats"]

    # Warm-up: touch every weight page, create kernels for each shape family, at small sizes.
    runner.prefill(prefill_prompt[:, :8], last_only=True)
    runner.prefill(prefill_prompt[:, :8], last_only=not runner.all_logits)
    batches = [b for b in batches if b <= runner.max_batch]
    for batch in batches:  # a few steps: CUDA graphs are recorded on a later call than the first
        runner.generate([p[:8] for p in decode_prompts[:batch]], 4)

    result: dict[str, Any] = {"load_s": load_s, "decode_tok_s": {}, "decode_steps": {}, "greedy": {}}
    for key, last_only in (("prefill_last_tok_s", True), ("prefill_all_tok_s", False)):
        if not (last_only or runner.all_logits):
            result[key] = None
            continue
        seconds = median_time(lambda: runner.prefill(prefill_prompt, last_only), repeats, device)
        result[key] = prefill_prompt.shape[1] / seconds
        print(f"{impl}: {key} {result[key]:.1f}", flush=True)

    for batch in batches:
        rates, steps = [], []
        for _ in range(repeats):
            seconds, n_steps, rows = timed_decode(
                runner, lambda: runner.generate(decode_prompts[:batch], new_tokens), device)
            rates.append(batch * n_steps / seconds)
            steps.append(n_steps)
        result["decode_tok_s"][str(batch)] = statistics.median(rates)
        result["decode_steps"][str(batch)] = steps
        result["greedy"][str(batch)] = rows
        print(f"{impl}: decode batch {batch} {result['decode_tok_s'][str(batch)]:.2f} tok/s", flush=True)

    # Memory is read now, before the extras below (the profiler's records, the quality logits) add their own.
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    result["misaligned_weights"] = runner.misaligned_weights()
    result["weights_kv_bytes"] = runner.weights_bytes() + kv_cache_bytes(spec, dtype)
    if impl == "ours":
        result["stop_tokens"] = sorted(runner.llama.tokenizer.stop_tokens)

    if spec.get("quality_logits_path"):
        with torch.inference_mode():
            logits = runner.prefill(torch.tensor([spec["quality_prompt"]], device=device), last_only=False)[0]
        torch.save(logits.float().cpu(), spec["quality_logits_path"])

    if spec.get("profile") and impl == "ours":
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
            runner.generate(decode_prompts[:1], new_tokens)
        finally:
            remove()
            if started:
                prof.stop()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        shapes = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
        Path(spec["profile"]).write_text(table + "\n\nGrouped by input shape:\n" + shapes)
        print(f"profile written to {spec['profile']}", flush=True)

    Path(spec["result_path"]).write_text(json.dumps(result))


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if arguments.worker is not None:
        worker(arguments.worker, json.loads(arguments.worker_spec.read_text()))
        sys.exit(0)
    check_args(arguments, parser)
    sys.exit(main(arguments))
