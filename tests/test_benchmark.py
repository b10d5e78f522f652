"""The benchmarks run end to end on the tiny preset. benchmarks/generation.py prints its table and, in float32, finds that ours
and transformers picked the same greedy tokens. Timings are only printed, never checked."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import bf16_cpu

pytestmark = pytest.mark.slow  # end-to-end: CI runs them; skip with -m "not slow"

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_runs_on_tiny_and_greedy_tokens_match(tmp_path):
    results = tmp_path / "results.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--preset", "tiny", "--dtype", "float32",
        "--prompt_len", "8", "--decode_prompt_len", "4", "--decode_tokens", "3", "--batch_sizes", "1,2",
        "--repeats", "1", "--threads", "1", "--bandwidth_mib", "16", "--cache_dir", str(tmp_path / "cache"),
        "--json", str(results),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("|  | load s | prefill 8 tok/s")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["ours", "transformers", "ours / transformers"]
    assert "Greedy tokens, ours vs transformers: 9/9 identical" in completed.stdout  # 3 tokens x (1 + 2) rows

    report = json.loads(results.read_text())
    for impl in ("ours", "transformers"):
        assert report["results"][impl]["decode_steps"] == {"1": [2], "2": [2]}  # 3 tokens: prefill + 2 steps
    assert report["results"]["ours"]["greedy"] == report["results"]["transformers"]["greedy"]


def test_benchmark_reports_int8_and_int4_quality_and_a_compiled_row(tmp_path):
    results = tmp_path / "results.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--preset", "tiny", "--dtype", "bfloat16",
        "--impl", "ours", "--quantize", "int8,int4", "--compile", "--prompt_len", "8", "--decode_prompt_len", "4",
        "--decode_tokens", "3", "--batch_sizes", "1", "--repeats", "1", "--threads", "1", "--bandwidth_mib", "16",
        "--quality_positions", "32", "--cache_dir", str(tmp_path / "cache"), "--json", str(results),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["ours", "ours int8", "ours int4", "ours compiled"]
    for name in ("int8", "int4"):
        assert f"Quantized ({name}) vs unquantized ours over 32 positions: top-1 agreement" in completed.stdout
    assert "ours in bfloat16 vs ours in float32" in completed.stdout

    report = json.loads(results.read_text())
    machine = report["machine"]
    for quality in (machine["quality"]["int8"], machine["quality"]["int4"], machine["rounding_quality"]):
        assert 0 <= quality["top1_agreement"] <= 1 and quality["kl"] >= 0 and quality["positions"] == 32
    assert machine["quality"]["int4"]["kl"] > machine["quality"]["int8"]["kl"]  # 4 bits cost more than 8
    # Rounding to bfloat16 changes the logits a little, not wholesale.
    assert report["machine"]["rounding_quality"]["top1_agreement"] > 0.5
    assert report["results"]["ours compiled"]["greedy"] == report["results"]["ours"]["greedy"]


def test_benchmark_rounds_alternate_the_workers_and_report_medians(tmp_path):
    results = tmp_path / "results.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--preset", "tiny", "--dtype", "float32",
        "--impl", "ours", "--quantize", "int8", "--rounds", "2", "--prompt_len", "8", "--decode_prompt_len", "4",
        "--decode_tokens", "3", "--batch_sizes", "1", "--repeats", "1", "--threads", "1", "--bandwidth_mib", "16",
        "--quality_positions", "16", "--cache_dir", str(tmp_path / "cache"), "--json", str(results),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    started = [line for line in completed.stdout.splitlines() if line.startswith("--- ours")]
    assert len(started) == 4  # ours, then ours int8, twice
    assert "round 2 of 2: measuring read bandwidth" in completed.stdout
    assert "median of 1 in each of 2 rounds, then the median over the rounds" in completed.stdout
    assert "Quantized (int8) vs unquantized ours over 16 positions" in completed.stdout  # measured once, kept


def test_median_over_rounds_takes_each_figure_from_all_rounds():
    spec = importlib.util.spec_from_file_location("generation_benchmark", ROOT / "benchmarks" / "generation.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rounds = [{"ours": {"load_s": load, "prefill_last_tok_s": prefill, "prefill_all_tok_s": None,
                        "peak_bytes": 100 * load, "decode_tok_s": {"1": decode}, "greedy": {"round": i}}}
              for i, (load, prefill, decode) in enumerate([(1.0, 30.0, 5.0), (3.0, 10.0, 9.0), (2.0, 20.0, 1.0)])]
    merged = benchmark.median_over_rounds(rounds)["ours"]
    assert (merged["load_s"], merged["prefill_last_tok_s"], merged["decode_tok_s"]) == (2.0, 20.0, {"1": 5.0})
    assert merged["peak_bytes"] == 200.0 and merged["prefill_all_tok_s"] is None
    assert merged["greedy"] == {"round": 0}  # what is not a timing comes from the first round


def test_benchmark_refuses_bad_arguments():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--batch_sizes", "1,0"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2 and "positive integers" in completed.stderr


def test_quality_benchmark_scores_every_position_of_each_chunk(tiny_checkpoint, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--ckpt_dir", str(tiny_checkpoint(1)),
               "--text", str(text), "--max_seq_len", "32"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    from llama.tokenizer import Tokenizer

    n_tokens = len(Tokenizer(tiny_checkpoint(1) / "tokenizer.model").encode(text.read_text(), bos=True, eos=False))
    chunks = -(-n_tokens // 32)
    assert f"{n_tokens - chunks} positions of text.txt ({n_tokens} tokens)" in completed.stdout
    assert "int8 vs bfloat16: top-1 agreement" in completed.stdout
    assert "int4 vs bfloat16: top-1 agreement" in completed.stdout
    assert "perplexity: float32" in completed.stdout and ", int8 " in completed.stdout and ", int4 " in completed.stdout


def test_gguf_export_round_trips_and_hugging_face_reads_its_vocabulary(tiny_checkpoint, tmp_path, monkeypatch):
    """benchmarks/gguf_export.py gives llama.cpp the benchmark's weights: from_gguf reads back the same tensors and
    Meta's tokenizer.model, and transformers' GGUF reader, using the recovered merges, encodes as Meta's tokenizer."""
    from transformers import AutoTokenizer

    from llama.checkpoint.gguf import convert_from_gguf
    from llama.checkpoint.load import load_shard
    from llama.tokenizer import Tokenizer

    ckpt, exported = tiny_checkpoint(1), tmp_path / "tiny.gguf"
    command = [sys.executable, str(ROOT / "benchmarks" / "gguf_export.py"), str(ckpt), str(exported),
               "--tensor_type", "F32"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    back = convert_from_gguf(exported, tmp_path / "back", dtype="float32")
    assert (back / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    original, restored = load_shard(ckpt / "consolidated.00.pth"), load_shard(back / "consolidated.00.pth")
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key].float(), restored[key]) for key in original)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=exported.name)
    meta = Tokenizer(ckpt / "tokenizer.model")
    texts = ["Hello, world!", "naïve café 中文 😀 1234567", "  tabs\t\tand\r\nnewlines\n\n", "I'm you're we'LL",
             "def f(x):\n    return x ** 2\n", "1,000,000 and 3.14159", "https://example.com/a?b=1#c"]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == [meta.encode(t, bos=False, eos=False)
                                                                       for t in texts]


def run_serve_benchmark(tmp_path, *options: str) -> tuple[dict, list[list[list[str]]]]:
    """Run benchmarks/serve.py on the tiny preset; its JSON line and its tables (rows of cells, header first)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--preset", "tiny", "--dtype", "float32",
               "--max_tokens", "4", "--max_seq_len", "128", "--cache_dir", str(tmp_path / "cache"), *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    results = json.loads(next(line for line in lines if line.startswith("{")))
    tables, table = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip("|").split("|")])
        elif table:
            tables.append([table[0], *table[2:]])
            table = []
    return results, tables


def vllm_fields_are_sound(run: dict) -> None:
    """`vllm bench serve`'s figures are there, positive, and the tokens add up to the throughputs."""
    for name in ("ttft", "tpot", "itl", "e2el"):
        for kind in ("mean", "median", "p99"):
            assert run[f"{kind}_{name}_ms"] > 0, (kind, name)
        assert run[f"median_{name}_ms"] <= run[f"p99_{name}_ms"]
    assert run["duration"] > 0 and run["total_input_tokens"] > 0 and 0 < run["total_output_tokens"]
    assert run["request_throughput"] == pytest.approx(run["completed"] / run["duration"])
    assert run["output_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration"])
    assert run["total_token_throughput"] == pytest.approx(
        (run["total_input_tokens"] + run["total_output_tokens"]) / run["duration"])


def test_serve_benchmark_runs_against_the_server_and_static_generate(tmp_path):
    results, tables = run_serve_benchmark(tmp_path, "--clients", "1,2", "--prompt_words", "8",
                                          "--impls", "ours,static")
    assert " | ".join(tables[0][0]).startswith("clients | total tok/s | TTFT p50 / p95 s")
    assert [row[0] for row in tables[0][1:]] == ["1", "2"]
    assert set(results["ours"]) == {"1", "2"} and results["static"]["2"] > 0 and results["llama.cpp"] is None
    assert [row[:3] for row in tables[1][1:]] == [["ours", "1 clients", "1"], ["ours", "2 clients", "2"]]
    for n in ("1", "2"):
        assert results["ours"][n]["completed"] == int(n) and results["ours"][n]["total_input_tokens"] == 9 * int(n)
        vllm_fields_are_sound(results["ours"][n])


def test_serve_benchmark_sends_random_token_prompts_at_a_poisson_request_rate(tmp_path):
    results, tables = run_serve_benchmark(tmp_path, "--request_rate", "8", "--num_prompts", "5",
                                          "--prompt_tokens", "12", "--max_batch_size", "4", "--repeats", "1",
                                          "--impls", "ours,static")
    run = results["ours"]["rate 8"]
    assert run["completed"] == 5 and run["total_input_tokens"] == 5 * 12  # token ids are sent as they are
    vllm_fields_are_sound(run)
    assert results["static"]["rate 8"] > 0
    assert len(tables) == 1 and tables[0][0][:3] == ["server", "load", "completed"]
    assert tables[0][1][:3] == ["ours", "rate 8", "5"]


def test_serve_benchmark_chat_workload_resends_the_history_and_times_each_turn(tmp_path):
    results, tables = run_serve_benchmark(tmp_path, "--workload", "chat", "--clients", "2", "--turns", "2",
                                          "--turn_tokens", "6", "--repeats", "1", "--impls", "ours,static")
    run = results["ours"]["2"]
    assert run["completed"] == 2 * 2 and results["static"] is None
    vllm_fields_are_sound(run)
    first, second = run["turns"]
    # the second turn's prompt holds the first's, the reply (up to 4 tokens) and 6 more words
    assert second["mean_prompt_tokens"] > first["mean_prompt_tokens"] + 6
    assert run["total_input_tokens"] == 2 * (first["mean_prompt_tokens"] + second["mean_prompt_tokens"])
    assert math.isnan(first["mean_cold_ttft_ms"]) and second["mean_cold_ttft_ms"] > 0
    assert all(turn[f"{kind}_ttft_ms"] > 0 for turn in run["turns"] for kind in ("mean", "median", "p99"))
    assert [row[:3] for row in tables[1][1:]] == [["ours", "2 clients", "1"], ["ours", "2 clients", "2"]]


def linear_weight_count(ckpt_dir: Path) -> int:
    """Weights of every matmul of the model in `ckpt_dir`, from params.json and Meta's FFN sizing rule."""
    params = json.loads((ckpt_dir / "params.json").read_text())
    dim, heads, kv_heads = params["dim"], params["n_heads"], params["n_kv_heads"]
    head_dim = dim // heads
    hidden = int(params["ffn_dim_multiplier"] * int(2 * 4 * dim / 3))
    hidden = params["multiple_of"] * -(-hidden // params["multiple_of"])
    per_layer = dim * (heads + 2 * kv_heads) * head_dim + heads * head_dim * dim + 3 * dim * hidden
    return params["n_layers"] * per_layer + dim * params["vocab_size"]


def run_decode_breakdown(ckpt_dir: Path, *options: str) -> list[list[str]]:
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_breakdown.py"), "--ckpt_dir", str(ckpt_dir),
               "--prompt_len", "4", "--tokens", "3", "--threads", "1", *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| batch-1 decode, median of 3 rounds | ms per token | tok/s |"
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in table[2:]]


def test_decode_breakdown_times_the_step_its_matmuls_and_the_compiled_step(tiny_checkpoint):
    rows = run_decode_breakdown(tiny_checkpoint(1), "--dtype", "float32", "--compile")
    names = [row[0] for row in rows]
    # "Linear layers alone" reads every matmul's weights once: 4 bytes each in float32.
    gigabytes = f"{4 * linear_weight_count(tiny_checkpoint(1)) / 1e9:.3g} GB of weights"
    assert names[0] == "ours" and names[1].startswith(f"its linear layers alone ({gigabytes}")
    assert names[2:] == ["the rest of its step (per round: step minus linear layers)", "ours compiled"]
    assert all(float(row[1]) > 0 for row in rows)
    assert rows[1][2] == rows[2][2] == "–" and float(rows[0][2]) > 0  # tok/s only for whole steps


def test_decode_breakdown_counts_int8_weights_as_one_byte_each(tiny_checkpoint):
    rows = run_decode_breakdown(tiny_checkpoint(1), "--dtype", "bfloat16", "--quantize", "int8")
    assert rows[0][0] == "ours int8"
    assert rows[1][0].startswith(f"its linear layers alone ({linear_weight_count(tiny_checkpoint(1)) / 1e9:.3g} GB")


@pytest.mark.skipif(not bf16_cpu.available(), reason="the bfloat16 CPU kernels need x86 AVX-512 BF16")
def test_decode_breakdown_times_bfloat16_as_before_its_kernels_too(tiny_checkpoint):
    rows = run_decode_breakdown(tiny_checkpoint(1), "--dtype", "bfloat16", "--onednn")
    assert [row[0] for row in rows][3:] == [
        "ours as before bf16_cpu (oneDNN's packed weights, torch's attention, RMSNorm and SwiGLU)"]
    assert float(rows[3][1]) > 0


def test_decode_breakdown_refuses_a_missing_gguf_file(tiny_checkpoint, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_breakdown.py"), "--ckpt_dir",
               str(tiny_checkpoint(1)), "--gguf", str(tmp_path / "absent.gguf")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "absent.gguf: no such file" in completed.stderr


def test_perplexity_benchmark_scores_the_same_positions_as_llama_cpp(tiny_checkpoint, tmp_path):
    """benchmarks/perplexity.py on a float32 GGUF of the tiny checkpoint: ours and llama.cpp see the same ids and
    score the same positions, so their perplexities agree to float32 rounding; the ids are those of the text."""
    pytest.importorskip("llama_cpp")
    gguf = tmp_path / "tiny.gguf"
    export = [sys.executable, str(ROOT / "benchmarks" / "gguf_export.py"), str(tiny_checkpoint(1)), str(gguf),
              "--tensor_type", "F32"]
    assert subprocess.run(export, capture_output=True, timeout=300).returncode == 0
    command = [sys.executable, str(ROOT / "benchmarks" / "perplexity.py"), "--gguf", str(gguf), "--tokens", "192",
               "--ctx", "64", "--threads", "1", "--work_dir", str(tmp_path / "work")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Llama 3's vocabulary adds BOS: each chunk is BOS and 63 ids of the text, of which 63 positions are scored.
    assert "3 chunks of 64 tokens" in completed.stdout and "scored from position 1 of each: 189 positions" in (
        completed.stdout)
    values = [float(line.rsplit(" ", 1)[1]) for line in completed.stdout.splitlines() if ": perplexity " in line]
    assert len(values) == 2 and values[0] == pytest.approx(values[1], rel=1e-4)


def test_perplexity_is_exp_of_the_mean_negative_log_probability_of_the_scored_tokens():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from perplexity import perplexity

    # Two chunks of 3 tokens over a vocabulary of 4; logits chosen so that each scored token has a known probability.
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    logits = [probabilities.log().numpy(), probabilities.flip(0).log().numpy()]
    chunks = [[0, 3, 0], [2, 1, 3]]
    # Scored from position 1: chunk 1 predicts 3 from row 0 (0.4) and 0 from row 1 (0.25); chunk 2 predicts 1 from
    # row 0 of the flipped rows (0.1) and 3 from row 1 (0.25).
    expected = math.exp(-(math.log(0.4) + math.log(0.25) + math.log(0.1) + math.log(0.25)) / 4)
    assert perplexity(iter(logits), chunks, first_scored=1) == pytest.approx(expected)
    assert perplexity(iter(logits), chunks, first_scored=2) == pytest.approx(math.exp(-(math.log(0.25) * 2) / 2))
