"""The generation benchmark's parent side of the workers: it runs each implementation in a fresh child process
(`generation.py --worker IMPL`), runs every worker once per round (with the quality figures in the first round),
and merges the rounds into medians."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench_agreement import float32_logits, quality_loss

GGUF_TYPES = {"int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's nearest format to each quantization of ours


def worker_spec(spec: dict[str, Any], quantize: str | None = None, compile: bool = False,
                profile: str | None = None, quality_logits_path: str | None = None, **extra: Any) -> dict[str, Any]:
    """The run's `spec` for one worker: unquantized, eager, not profiled and keeping no logits unless told."""
    return {**spec, **extra, "quantize": quantize, "compile": compile, "profile": profile,
            "quality_logits_path": quality_logits_path}


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


def llama_cpp_workers(meta_dir: Path, args: argparse.Namespace, spec: dict[str, Any],
                      script: Path) -> dict[str, dict[str, Any]]:
    """llama.cpp on GGUF files written from the benchmark's checkpoint: F16 (F32 for a float32 run), and beside
    each quantization of ours its counterpart (GGUF_TYPES), each written once into the checkpoint's cache folder.
    With ours among the implementations, ours also runs each quantized file's blocks as they are (`from_gguf`)."""
    from gguf_export import export_gguf  # only runs with llama.cpp need it

    types = ["F32" if args.dtype == "float32" else "F16"] + [GGUF_TYPES[name] for name in args.quantize]
    results = {}
    for tensor_type in types:
        path = meta_dir.parent / f"model-{tensor_type}.gguf"
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            export_gguf(meta_dir, path.with_suffix(".partial"), tensor_type).rename(path)
        results[f"llama.cpp {tensor_type}"] = run_worker("llama.cpp", worker_spec(spec, gguf=str(path)), script)
        if "ours" in args.impl and tensor_type in GGUF_TYPES.values():
            blocks_dir = gguf_blocks_checkpoint(path)
            results[f"ours on the {tensor_type} file"] = run_worker(
                "ours", worker_spec(spec, meta_dir=str(blocks_dir)), script)
    return results


def gguf_blocks_checkpoint(gguf: Path) -> Path:
    """The checkpoint `from_gguf` writes of `gguf` (its blocks kept), written once beside it."""
    from llama.checkpoint.gguf import convert_from_gguf

    folder = gguf.with_name(f"{gguf.stem}-blocks")
    if not (folder / "complete").is_file():
        print(f"writing {folder} ...", flush=True)
        convert_from_gguf(gguf, folder, overwrite=True)
        (folder / "complete").touch()
    return folder


def run_round(args: argparse.Namespace, spec: dict[str, Any], script: Path, meta_dir: Path, logits_dir: Path,
              machine: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every worker once, in the order of the table. With `machine` (the first round), also the quality figures."""
    results: dict[str, dict[str, Any]] = {}
    quality = machine is not None and bool(args.quantize)
    profile = spec["profile"] if machine is not None else None  # the first round's profile is enough
    for impl in [name for name in args.impl if name != "llama.cpp"]:
        # Only ours unquantized needs to keep logits: the quantized model's quality is measured against it.
        quality_path = str(logits_dir / "ours.pt") if quality and impl == "ours" else None
        results[impl] = run_worker(impl, worker_spec(spec, profile=profile, quality_logits_path=quality_path),
                                   script)
    for name in args.quantize:
        quantized_path = logits_dir / f"{name}.pt"
        results[f"ours {name}"] = run_worker(
            "ours", worker_spec(spec, quantize=name, quality_logits_path=str(quantized_path) if quality else None),
            script)
        if quality:
            machine.setdefault("quality", {})[name] = quality_loss(logits_dir / "ours.pt", quantized_path)
    if quality and args.dtype != "float32":
        # For scale: how often mere rounding to the run's dtype flips the top token of these weights.
        float32_path = logits_dir / "float32.pt"
        torch.save(float32_logits(meta_dir, spec["quality_prompt"], args.device), float32_path)
        machine["rounding_quality"] = quality_loss(float32_path, logits_dir / "ours.pt")
    if "llama.cpp" in args.impl:
        results.update(llama_cpp_workers(meta_dir, args, spec, script))
    if args.compile:
        results["ours compiled"] = run_worker("ours", worker_spec(spec, compile=True), script)
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
