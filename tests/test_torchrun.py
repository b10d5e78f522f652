"""Under torchrun, model-parallel and multi-node runs give what one process gives; the examples run end to end."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_worker import serve, serve_prompt_lookup
from generation_worker import generate_all

pytestmark = pytest.mark.slow  # end-to-end: CI runs them; skip with -m "not slow"

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(script: Path, *args: str, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*command, str(script), *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def single_process_result(build_tiny) -> dict:
    return generate_all(build_tiny(max_seq_len=64, max_batch_size=4, seed=1))


def _assert_same_as_single_process(out: Path, world_size: int, expected: dict) -> None:
    results = [torch.load(f"{out}.rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    for result in results:
        assert result["greedy"] == expected["greedy"]
        assert result["sampled"] == expected["sampled"]
        assert (result["logits"] - expected["logits"]).abs().max().item() <= 1e-5
        assert torch.equal(result["logits"], results[0]["logits"])


@pytest.mark.parametrize("world_size", [2, 4])
def test_any_shard_count_on_any_process_count_matches_one_process(
    tiny_checkpoint, single_process_result, tmp_path, world_size
):
    # Checkpoints of 1, 2 and 4 shards (tiny has 2 kv heads: with 4 processes each is replicated).
    out = tmp_path / "run"
    shard_counts = [1, 2, 4]
    ckpts = [str(tiny_checkpoint(m)) for m in shard_counts]
    torchrun(ROOT / "tests" / "generation_worker.py", str(out), *ckpts, nproc=world_size)
    for i in range(len(shard_counts)):
        _assert_same_as_single_process(Path(f"{out}.{i}"), world_size, single_process_result)


@pytest.mark.parametrize("shard_count", [2, 4])
def test_any_shard_count_in_one_process_matches(build_tiny, tiny_checkpoint, single_process_result, shard_count):
    from llama import Llama

    llama = Llama.build(tiny_checkpoint(shard_count), max_seq_len=64, max_batch_size=4, seed=1, device="cpu",
                        dtype=torch.float32)
    result = generate_all(llama)
    assert result["greedy"] == single_process_result["greedy"]
    assert result["sampled"] == single_process_result["sampled"]
    assert (result["logits"] - single_process_result["logits"]).abs().max().item() <= 1e-5


def test_int8_works_under_model_parallelism(tiny_checkpoint, single_process_result, tmp_path):
    out = tmp_path / "int8"
    torchrun(ROOT / "tests" / "generation_worker.py", str(out), str(tiny_checkpoint(2)), "--quantize=int8", nproc=2)
    ranks = [torch.load(f"{out}.0.rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"]) and ranks[0]["greedy"] == ranks[1]["greedy"]
    # Each process quantizes its own shard; the result stays close to the unquantized model.
    expected = single_process_result["logits"]
    assert (ranks[0]["logits"] - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_bfloat16_decode_steps_under_model_parallelism_add_up_every_process_share(tiny_checkpoint, tmp_path):
    """On a CPU with `bf16_cpu`'s kernels a block decodes in one call, except where its modules carry hooks, as
    tensor parallelism's all-reduce after wo and w2 are: without them each process would keep half of each sum."""
    from llama import Llama

    out = tmp_path / "bf16"
    torchrun(ROOT / "tests" / "generation_worker.py", str(out), str(tiny_checkpoint(2)), "--dtype=bfloat16", nproc=2)
    ranks = [torch.load(f"{out}.0.rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.equal(ranks[0]["decode_step"], ranks[1]["decode_step"])
    expected = generate_all(Llama.build(tiny_checkpoint(1), max_seq_len=64, max_batch_size=4, seed=1, device="cpu",
                                        dtype=torch.bfloat16))["decode_step"]
    assert (ranks[0]["decode_step"] - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_int4_under_model_parallelism_holds_the_weights_one_process_does(tmp_path):
    """Each process quantizes its own shard. int4's groups of input values lie within a shard's columns (wo and
    w2 are split by columns, in whole groups), so two processes compute with exactly the weights one process does."""
    from llama import Llama
    from llama.args import PRESETS
    from llama.checkpoint.random_weights import write_random_checkpoint

    params = {**PRESETS["tiny"], "multiple_of": 64}  # ffn hidden dim 256: w2 has 128 columns in each process
    one, two = (write_random_checkpoint(tmp_path / f"mp{n}", params, n, seed=0) for n in (1, 2))
    out = tmp_path / "int4"
    torchrun(ROOT / "tests" / "generation_worker.py", str(out), str(two), "--quantize=int4", nproc=2)
    expected = generate_all(Llama.build(one, max_seq_len=64, max_batch_size=4, seed=1, device="cpu",
                                        dtype=torch.float32, quantize="int4"))
    _assert_same_as_single_process(Path(f"{out}.0"), 2, expected)


def test_compiled_decoding_works_under_model_parallelism(tiny_checkpoint, single_process_result, tmp_path):
    out = tmp_path / "compiled"
    torchrun(ROOT / "tests" / "generation_worker.py", str(out), str(tiny_checkpoint(2)), "--compile", nproc=2,
             timeout=900)
    _assert_same_as_single_process(Path(f"{out}.0"), 2, single_process_result)


def test_rank_0_serves_while_rank_1_follows_its_plan(build_tiny, tiny_checkpoint, tmp_path):
    out = tmp_path / "served.pt"
    torchrun(ROOT / "tests" / "engine_worker.py", str(out), str(tiny_checkpoint(2)), nproc=2)
    served = torch.load(out, weights_only=True)
    assert served == serve(build_tiny(max_seq_len=64, max_batch_size=2, seed=1))
    assert served["finish_reasons"] == ["cancelled", "length", "length", "length", "length"]
    assert served["prefix_hit_tokens"] > 0  # the follow-up reused the cached prefix on both ranks alike


def test_two_processes_with_prompt_lookup_agree_with_one(build_tiny, tiny_checkpoint, tmp_path):
    out = tmp_path / "lookup.pt"
    torchrun(ROOT / "tests" / "engine_worker.py", str(out), str(tiny_checkpoint(2)), "--job=prompt_lookup",
             "--prompt_lookup=4", nproc=2)
    served, follower = torch.load(out, weights_only=True), torch.load(f"{out}.rank1", weights_only=True)
    assert served == serve_prompt_lookup(build_tiny(max_seq_len=64, max_batch_size=2, seed=1, prompt_lookup=4))
    assert served["drafted"][2] > 0 and follower["drafted"] == served["drafted"]
    # and what prompt lookup gives is what decoding without it gives
    assert served["tokens"] == serve_prompt_lookup(build_tiny(max_seq_len=64, max_batch_size=2, seed=1))["tokens"]


def test_two_nodes_on_localhost_match_one_process(tiny_checkpoint, single_process_result, free_port, tmp_path):
    out, port = tmp_path / "nodes", free_port
    nodes = []
    for node_rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                   str(ROOT / "tests" / "generation_worker.py"), str(out), str(tiny_checkpoint(2))]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for node in nodes:
        output, _ = node.communicate(timeout=240)
        assert node.returncode == 0, output[-5000:]
    _assert_same_as_single_process(Path(f"{out}.0"), 2, single_process_result)


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_run_end_to_end(tiny_checkpoint, script, nproc):
    result = torchrun(ROOT / script, f"--ckpt_dir={tiny_checkpoint(nproc)}", "--max_gen_len=8", nproc=nproc)
    # Only rank 0 prints: each prompt or dialog appears once.
    assert result.stdout.count("==================================") == (4 if "text" in script else 5)
    assert result.stdout.count("> ") >= 4


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_have_help(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env={**_env(), "PAGER": "cat"},
                            capture_output=True, text=True, timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == 0 and "ckpt_dir" in text.lower() and "--max_seq_len" in text
