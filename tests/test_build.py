"""`Llama.build` loads Meta's checkpoint layout and explains every way a checkpoint folder can be wrong."""

import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from llama import Llama, ModelArgs
from llama.checkpoint.load import load_model, read_params
from llama.kernels import PackedLinear


@pytest.fixture
def broken_checkpoint(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny MP=1 checkpoint, for breaking."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(1), dst)
    return dst


def _build(ckpt_dir, **kwargs):
    return Llama.build(ckpt_dir, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32", **kwargs)


def test_build_reports_load_time_and_keeps_the_runtime_sizes(tiny_checkpoint, capsys):
    llama = _build(tiny_checkpoint(1))
    assert "Loaded" in capsys.readouterr().out
    assert (llama.model.args.max_seq_len, llama.model.args.max_batch_size) == (32, 2)
    assert llama.model.output.weight.dtype == torch.float32 and llama.device == torch.device("cpu")


def test_default_dtype_on_cpu_is_bfloat16(tiny_checkpoint):
    llama = Llama.build(tiny_checkpoint(1), max_seq_len=32, max_batch_size=2, device="cpu")
    assert llama.model.output.weight.dtype == torch.bfloat16
    assert len(llama.text_completion(["Hi"], temperature=0, max_gen_len=3)) == 1


def test_params_json_with_unknown_keys_loads_with_a_warning(broken_checkpoint):
    params = json.loads((broken_checkpoint / "params.json").read_text())
    (broken_checkpoint / "params.json").write_text(json.dumps({**params, "some_future_key": 1}))
    with pytest.warns(UserWarning, match="some_future_key"):
        _build(broken_checkpoint)


def test_missing_folder_params_or_shards(broken_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _build(tmp_path / "nowhere", tokenizer_path=broken_checkpoint / "tokenizer.model")
    (broken_checkpoint / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth"):
        _build(broken_checkpoint)
    (broken_checkpoint / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        _build(broken_checkpoint)


def test_missing_tokenizer_names_the_file(broken_checkpoint):
    (broken_checkpoint / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        _build(broken_checkpoint)


def test_a_two_shard_checkpoint_runs_in_one_process(tiny_checkpoint):
    one, two = _build(tiny_checkpoint(1)), _build(tiny_checkpoint(2))
    tokens = torch.tensor([one.tokenizer.encode("Merging shards keeps every weight", bos=True, eos=False)])
    assert torch.equal(one.model(tokens, 0), two.model(tokens, 0))


def test_incompatible_process_count_lists_the_valid_ones(tiny_checkpoint):
    args = ModelArgs.from_params(read_params(tiny_checkpoint(2)), max_seq_len=32)
    with pytest.raises(ValueError, match=r"2 shards and cannot be split over 3 processes; .* are \[1, 2, 4\]"):
        load_model(tiny_checkpoint(2), args, 0, 3, torch.device("cpu"), torch.float32)


def test_model_parallel_size_must_match_the_process_count(tiny_checkpoint):
    with pytest.raises(ValueError, match="model_parallel_size=2 but 1 processes"):
        _build(tiny_checkpoint(1), model_parallel_size=2)


def test_vocab_size_must_match_the_tokenizer(broken_checkpoint, tmp_path):
    small_tokenizer = tmp_path / "small.model"
    lines = (broken_checkpoint / "tokenizer.model").read_bytes().splitlines()[:1000]
    small_tokenizer.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match="vocab_size 128256 but the tokenizer .* has 1256 tokens"):
        _build(broken_checkpoint, tokenizer_path=small_tokenizer)


def test_missing_and_unexpected_keys_are_listed(broken_checkpoint):
    path = broken_checkpoint / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["layers.0.attention.wq.bias"] = state_dict.pop("layers.1.ffn_norm.weight")
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.ffn_norm.weight'\].*unexpected keys "
                                         r"\['layers.0.attention.wq.bias'\]"):
        _build(broken_checkpoint)


def test_wrong_shape_names_key_and_both_shapes(broken_checkpoint):
    path = broken_checkpoint / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["layers.1.attention.wk.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"layers.1.attention.wk.weight has shape \(64, 64\) but .* \(32, 64\)"):
        _build(broken_checkpoint)


def test_truncated_shard_names_the_file(broken_checkpoint):
    path = broken_checkpoint / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="consolidated.00.pth is truncated"):
        _build(broken_checkpoint)


def test_bad_runtime_arguments(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_seq_len"):
        Llama.build(tiny_checkpoint(1), max_seq_len=0, device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        Llama.build(tiny_checkpoint(1), device="cpu", dtype="int8")


class _CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_shard_whose_pickle_would_run_code_is_refused(broken_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    path = broken_checkpoint / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["norm.weight"] = _CreatesAFileWhenUnpickled(marker)
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match="consolidated.00.pth holds more than tensors"):
        _build(broken_checkpoint)
    assert not marker.exists()


def test_a_gap_in_shard_numbers_names_the_missing_file(tiny_checkpoint, tmp_path):
    dst = tmp_path / "gap"
    shutil.copytree(tiny_checkpoint(4), dst)
    (dst / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match="consolidated.01.pth is missing"):
        _build(dst)


def test_garbage_shard_names_the_file(broken_checkpoint):
    (broken_checkpoint / "consolidated.00.pth").write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(ValueError, match="consolidated.00.pth is truncated or not a torch checkpoint"):
        _build(broken_checkpoint)


def test_integer_weights_are_refused(broken_checkpoint):
    path = broken_checkpoint / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["norm.weight"] = torch.ones(64, dtype=torch.int8)
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match="norm.weight has dtype torch.int8; weights must be floating point"):
        _build(broken_checkpoint)


def test_bad_params_json(broken_checkpoint):
    (broken_checkpoint / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        _build(broken_checkpoint)
    (broken_checkpoint / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 3,
                                                               "vocab_size": 128256}))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        _build(broken_checkpoint)


def test_large_loads_show_progress_on_stderr(tiny_checkpoint, monkeypatch, capsys):
    import llama.checkpoint.load

    monkeypatch.setattr(llama.checkpoint.load, "PROGRESS_MIN_BYTES", 0)
    _build(tiny_checkpoint(2))
    err = capsys.readouterr().err
    assert "Loading weights: 100% of 0.1 GB" in err and err.count("\r") <= 101


def test_cpu_bfloat16_weights_are_packed_and_compute_the_same(tiny_checkpoint, monkeypatch):
    """Where llama.bf16_cpu's kernel cannot run (no AVX-512 BF16), bfloat16 weights are packed for oneDNN."""
    import llama.kernels

    monkeypatch.setattr(llama.kernels.bf16_cpu, "available", lambda: False)
    def logits(llama):
        tokens = torch.tensor([llama.tokenizer.encode("Packed weights give the same logits", bos=True, eos=False)])
        return llama.model(tokens, 0)

    bf16 = {"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", "dtype": torch.bfloat16}
    packed = Llama.build(tiny_checkpoint(1), **bf16)
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) == 2 * 4 + 1  # every linear layer
    monkeypatch.setattr(llama.kernels, "pack_for_cpu", lambda weight: None)  # as where oneDNN cannot pack
    plain = Llama.build(tiny_checkpoint(1), **bf16)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    expected = logits(plain)
    assert (logits(packed) - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
    # Decoding through the cache too.
    assert packed.text_completion(["Hello there"], temperature=0, max_gen_len=6) == plain.text_completion(
        ["Hello there"], temperature=0, max_gen_len=6
    )


FAULTS_BEFORE_AND_AFTER_A_BUILD = """
import ctypes, resource, sys, torch
from llama import Llama

ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD fixed at glibc's initial 128 KB: a known start

def faults_per_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        blocks = [torch.ones(4 << 20) for _ in range(3)] + [torch.ones(16 << 20)]  # 3 x 16 MB and 64 MB, freed
        del blocks
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4

before = faults_per_round()
Llama.build(sys.argv[1], device="cpu", max_seq_len=8, max_batch_size=1)
faults_per_round()
print(before, faults_per_round())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_cpu_build_keeps_freed_memory_instead_of_faulting_it_in_again(tiny_checkpoint):
    # A prompt's activations are blocks like these, allocated and freed once per layer.
    result = subprocess.run([sys.executable, "-c", FAULTS_BEFORE_AND_AFTER_A_BUILD, str(tiny_checkpoint(1))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = map(float, result.stdout.split()[-2:])
    assert before >= (3 * 16 + 64 << 20) // 4096  # every page given back to the kernel and faulted in again
    assert after < 100
