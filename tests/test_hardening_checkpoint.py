"""Hostile input to the checkpoint code: files with wrong types are refused by name, output folders never cost data,
and `python -m llama.checkpoint` refuses bad command lines before doing anything, in one line."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.args import ModelArgs
from llama.checkpoint.hf import convert_from_hf, convert_to_hf
from llama.checkpoint.load import load_model, read_params, shard_paths
from llama.checkpoint.random_weights import write_random_checkpoint
from llama.checkpoint.reshard import reshard_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_ckpt(small_params, tmp_path_factory) -> Path:
    """A one-shard checkpoint of the small model (about 1 MB of weights, plus tokenizer.model)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", small_params, seed=1)


@pytest.fixture(scope="module")
def small_hf(small_ckpt, tmp_path_factory) -> Path:
    """The small checkpoint as an HF folder, without a tokenizer."""
    return convert_to_hf(small_ckpt, tmp_path_factory.mktemp("small-hf") / "hf", tokenizer=False)


@pytest.fixture
def ckpt(small_ckpt, tmp_path) -> Path:
    """A writable copy of the small checkpoint, for breaking."""
    return Path(shutil.copytree(small_ckpt, tmp_path / "ckpt"))


@pytest.fixture
def hf(small_hf, tmp_path) -> Path:
    """A writable copy of the small HF folder, for breaking."""
    return Path(shutil.copytree(small_hf, tmp_path / "hf"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under `root` (hidden ones too), with the bytes of each file."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama.checkpoint", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def assert_one_line_error(done: subprocess.CompletedProcess, status: int) -> str:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def loads(folder: Path) -> int:
    """Load every shard of the Meta checkpoint `folder` into a model (raises if it is incomplete); its shard count."""
    args = ModelArgs.from_params(read_params(folder), max_seq_len=8, max_batch_size=1)
    load_model(folder, args, 0, 1, torch.device("cpu"), torch.float32)
    return len(shard_paths(folder))


def complete(folder: Path) -> int:
    """`loads(folder)`, after checking that its checklist.chk lists and verifies every file in it."""
    listed = sorted(line.split("  ", 1)[1] for line in (folder / "checklist.chk").read_text().splitlines())
    assert listed == sorted(p.name for p in folder.iterdir() if p.name != "checklist.chk")
    assert subprocess.run(["md5sum", "--quiet", "-c", "checklist.chk"], cwd=folder).returncode == 0
    return loads(folder)


# ---------------------------------------------------------------------------------------------------------------
# Files with the wrong types
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("rope_theta", "500000.0"), ("dim", True), ("n_kv_heads", "2"), ("n_kv_heads", 0), ("ffn_dim_multiplier", "1.3"),
    ("use_scaled_rope", "true"), ("norm_eps", math.nan), ("rope_scaling_factor", math.inf), ("multiple_of", 32.0),
    ("vocab_size", None),
])  # fmt: skip
def test_params_json_fields_are_checked_and_named_with_the_file(ckpt, field, value):
    path = ckpt / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    expected = re.escape(str(path)) + rf": ModelArgs\.{field} must be .*, got "
    with pytest.raises(ValueError, match=expected):
        reshard_checkpoint(ckpt, ckpt.parent / "out", 1)
    with pytest.raises(ValueError, match=expected):
        Llama.build(ckpt, device="cpu", max_seq_len=8, max_batch_size=1)
    assert not (ckpt.parent / "out").exists()


@pytest.mark.parametrize("dim", [2**40, 2**52])  # the second: more parameters than torch can count
def test_a_model_too_large_for_the_device_is_refused_with_its_size(ckpt, dim):
    args = ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512)
    with pytest.raises(ValueError, match=r"does not fit: .*weights .* GB.* KV cache .* GB.* memory"):
        load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.bfloat16)


def test_a_kv_cache_too_large_for_the_device_is_refused_with_its_size(ckpt):
    args = ModelArgs.from_params(read_params(ckpt), max_seq_len=2**40, max_batch_size=4)
    with pytest.raises(ValueError, match=r"does not fit: .*KV cache \(max_batch_size 4 × max_seq_len 1099511627776\)"):
        load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.bfloat16)


def test_a_shard_holding_a_non_tensor_is_named(ckpt):
    path = ckpt / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    state_dict["norm.weight"] = [1.0, 2.0]
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": norm.weight is a list, not a tensor"):
        loads(ckpt)


def _edit_config(hf: Path, **fields) -> Path:
    path = hf / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
    ({"hidden_size": "64"}, r"hidden_size must be a positive integer, got '64'"),
    ({"rope_parameters": [1]}, r"rope_parameters must be a JSON object or null, got \[1\]"),
    ({"rope_parameters": None, "rope_scaling": None, "rope_theta": "1e4"}, r"rope_theta must be a number > 0"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings must be true or false, got 'false'"),
    ({"rms_norm_eps": -1}, r"rms_norm_eps must be a number > 0, got -1"),
])  # fmt: skip
def test_bad_hf_config_fields_are_named(hf, tmp_path, fields, message):
    path = _edit_config(hf, **fields)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        convert_from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_hf_config_that_is_not_an_object_is_named(hf, tmp_path):
    (hf / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(hf / "config.json")) + " must hold a JSON object, not list"):
        convert_from_hf(hf, tmp_path / "out")


def test_a_truncated_safetensors_file_is_named(hf, tmp_path):
    path = hf / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is truncated or not a safetensors file"):
        convert_from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_safetensors_index_whose_weight_map_is_not_an_object_is_named(hf, tmp_path):
    index = hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": ["model.safetensors"]}))
    with pytest.raises(ValueError, match=re.escape(str(index)) + r": weight_map must map tensor names to file "
                                                                 r"names, got list"):
        convert_from_hf(hf, tmp_path / "out")


def test_an_index_naming_a_file_outside_the_folder_is_refused(hf, tmp_path):
    from safetensors import safe_open

    with safe_open(hf / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
    (tmp_path / "elsewhere.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    weight_map = {name: "../elsewhere.safetensors" for name in names}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"weight_map: '\.\./elsewhere\.safetensors' is not a file name in"):
        convert_from_hf(hf, tmp_path / "out")


def test_integer_tensors_in_an_hf_folder_are_refused_before_writing(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, hf / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(str(hf / "model.safetensors")) +
                       r": model.norm.weight has dtype I8; weights must be floating point"):
        convert_from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Output folders: no data loss
# ---------------------------------------------------------------------------------------------------------------


def test_reshard_into_the_current_folder_with_overwrite_deletes_nothing(small_ckpt, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(small_ckpt, work / "src")
    (work / "notes.txt").write_text("mine")
    (work / "project").mkdir()
    (work / "project" / "main.py").write_text("print('mine')")
    before = snapshot(work)
    done = cli("reshard", "src", ".", "--model_parallel_size", "1", "--overwrite", cwd=work)
    line = assert_one_line_error(done, 1)
    assert "current folder" in line
    assert snapshot(work) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_destination_equal_to_the_source_is_refused_before_any_work(ckpt, tmp_path, monkeypatch):
    before = snapshot(tmp_path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: pytest.fail("wrote a shard"))
    for same in (ckpt, tmp_path / "elsewhere" / ".." / "ckpt"):  # compared after resolving `..`
        with pytest.raises(ValueError, match="is the source"):
            reshard_checkpoint(ckpt, same, 1, overwrite=True)
    (tmp_path / "link").symlink_to(ckpt)
    with pytest.raises(ValueError, match="is the source"):
        convert_to_hf(tmp_path / "link", ckpt, overwrite=True)
    (tmp_path / "link").unlink()
    assert snapshot(tmp_path) == before


def test_destination_holding_the_source_is_refused_and_one_inside_it_changes_nothing_there(ckpt, hf, tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="holds the source"):
        convert_to_hf(ckpt, tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="holds the source"):
        convert_from_hf(hf, tmp_path, overwrite=True)
    assert snapshot(tmp_path) == before
    reshard_checkpoint(ckpt, ckpt / "mp2", 2)  # a new folder inside the source: allowed
    reshard_checkpoint(ckpt, ckpt / "mp2", 1, overwrite=True)
    assert loads(ckpt / "mp2") == 1 and loads(ckpt) == 1  # the source still loads, its files unchanged
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("ckpt/mp2")} == before


def test_an_ancestor_of_the_current_folder_is_refused(small_ckpt, tmp_path, monkeypatch):
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    (inner / "work.txt").write_text("mine")
    monkeypatch.chdir(inner)
    for dst in (tmp_path / "outer", Path("..")):
        with pytest.raises(ValueError, match="current folder"):
            reshard_checkpoint(small_ckpt, dst, 1, overwrite=True)
    assert (inner / "work.txt").read_text() == "mine" and os.listdir(tmp_path / "outer") == ["inner"]


def test_overwrite_refuses_a_folder_holding_files_it_did_not_write(ckpt, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "params.json").write_text("{}")
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        reshard_checkpoint(ckpt, dst, 1, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt", "params.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dst"]


def test_a_symlinked_destination_is_written_where_it_points(ckpt, tmp_path):
    real, link = tmp_path / "disk" / "real", tmp_path / "link"
    real.mkdir(parents=True)
    link.symlink_to(real)
    reshard_checkpoint(ckpt, link, 1)
    assert link.is_symlink() and (real / "params.json").is_file() and loads(link) == 1
    reshard_checkpoint(ckpt, link, 2, overwrite=True)  # replaced where it points; the link stays a link
    assert link.is_symlink() and loads(real) == 2
    convert_to_hf(ckpt, link, overwrite=True, tokenizer=False)
    assert link.is_symlink() and (real / "config.json").is_file() and not list(real.glob("*.pth"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "disk", "link"]
    assert os.listdir(tmp_path / "disk") == ["real"]  # no leftovers beside the real folder either


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    import torch
    import llama.checkpoint.write
    from llama.checkpoint.reshard import reshard_checkpoint

    target, at = sys.argv[3], int(sys.argv[4])
    if target == "rename-without-swap":  # as where the system cannot swap two folders in one step
        target, llama.checkpoint.write._exchange = "rename", lambda a, b: False
    module, name = (torch, "save") if target == "save" else (os, target)
    real, calls = getattr(module, name), [0]

    def killing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, name, killing)
    reshard_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), 2, overwrite=True)
""")


@pytest.mark.parametrize(("target", "at"), [("save", 2), ("rename", 1), ("unlink", 2), ("rename-without-swap", 1)])
def test_a_kill_mid_overwrite_leaves_a_complete_folder_and_named_leftovers(ckpt, tmp_path, capsys, target, at):
    dst = tmp_path / "out" / "dst"
    reshard_checkpoint(ckpt, dst, 1)  # the old output, to be replaced by a 2-shard one
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(ckpt), str(dst), target, str(at)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode in (0, -9), killed.stderr
    assert complete(dst) in (1, 2)  # the old or the new output
    leftovers = [p.name for p in dst.parent.iterdir() if p != dst]
    assert all(re.fullmatch(r"\.dst\.(partial|old)-\w+", name) for name in leftovers), leftovers
    capsys.readouterr()
    reshard_checkpoint(ckpt, dst, 2, overwrite=True)
    assert os.listdir(dst.parent) == ["dst"] and complete(dst) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in leftovers) and len(err.splitlines()) == len(leftovers)


def test_leftovers_of_killed_runs_are_removed_by_the_next_run_with_a_note(ckpt, tmp_path, capsys):
    for name in (".dst.partial-ab12cd", ".dst.old-ef34gh", ".other.partial-ij56kl"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "consolidated.00.pth").write_bytes(b"half")
    reshard_checkpoint(ckpt, tmp_path / "dst", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-ij56kl", "ckpt", "dst"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("left by an interrupted run" in line for line in err)


def test_to_hf_output_has_a_checklist_covering_every_file(small_ckpt, tmp_path):
    with pytest.warns(UserWarning, match="no HF tokenizer is written"):
        dst = convert_to_hf(small_ckpt, tmp_path / "hf")
    listed = sorted(line.split("  ", 1)[1] for line in (dst / "checklist.chk").read_text().splitlines())
    assert listed == ["config.json", "model.safetensors", "original/tokenizer.model"]
    checked = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=dst, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 3


# ---------------------------------------------------------------------------------------------------------------
# The command line: checked before any work, one-line errors
# ---------------------------------------------------------------------------------------------------------------


def test_a_misspelt_flag_is_refused_before_any_output_exists(small_ckpt, tmp_path):
    done = cli("to_hf", str(small_ckpt), str(tmp_path / "hf"), "--max_shard_sise", "1MB")
    line = assert_one_line_error(done, 2)
    assert "--max_shard_sise" in line and "did you mean --max_shard_size?" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["random", "{dst}", "--preset", "nope"], "--preset must be one of tiny, 1B, 3B, 8B, 70B, got 'nope'"),
    (["random", "{dst}", "--dtype", "int3"], "--dtype must be one of float32, bfloat16, float16, got 'int3'"),
    (["random", "{dst}", "--seed", "1.5"], "--seed must be an integer >= 0, got '1.5'"),
    (["random", "{dst}", "--overwrite=maybe"], "--overwrite must be True or False, got 'maybe'"),
    (["reshard", "{src}", "{dst}", "--model_parallel_size", "abc"], "--model_parallel_size must be an integer >= 1"),
    (["reshard", "{src}", "{dst}", "-m", "0"], "--model_parallel_size must be an integer >= 1, got '0'"),
    (["reshard", "{src}", "{dst}"], "reshard needs MODEL_PARALLEL_SIZE"),
    (["reshard", "{src}", "{dst}", "2", "extra"], "unexpected argument 'extra'"),
    (["reshard", "{src}", "{dst}", "-m", "2", "--model_parallel_size", "2"], "--model_parallel_size given twice"),
    (["to_hf", "{src}", "{dst}", "--max_shard_size", "-1"], "--max_shard_size must be a positive number of bytes"),
    (["random", "{dst}", "-d", "float32"], "-d is ambiguous (could be --dst or --dtype)"),
    (["to_hf", "{src}", "{dst}", "-", "upper"], "argument '-' is not supported"),
    (["reshrd", "{src}", "{dst}"], "unknown command 'reshrd' (did you mean reshard? valid: random, reshard"),
])  # fmt: skip
def test_bad_arguments_exit_2_before_any_work(small_ckpt, tmp_path, capsys, argv, message):
    from llama.checkpoint.__main__ import main

    argv = [arg.format(src=small_ckpt, dst=tmp_path / "dst") for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_exit_status_1_for_failures_2_for_usage_and_tracebacks_only_on_request(ckpt, tmp_path):
    missing = cli("reshard", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--model_parallel_size", "1")
    assert "checkpoint folder not found" in assert_one_line_error(missing, 1)
    (ckpt / "params.json").write_text(json.dumps({**read_params(ckpt), "rope_theta": "500000.0"}))
    bad_file = cli("reshard", str(ckpt), str(tmp_path / "dst"), "--model_parallel_size", "1")
    assert "ModelArgs.rope_theta" in assert_one_line_error(bad_file, 1)
    usage = cli("reshard", str(ckpt), str(tmp_path / "dst"), "--model_parallel_size", "x")
    assert_one_line_error(usage, 2)
    debug = cli("reshard", str(ckpt), str(tmp_path / "dst"), "--model_parallel_size", "1", LLAMA_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModelArgs.rope_theta" in debug.stderr
    assert not (tmp_path / "dst").exists()


def test_help_after_arguments_shows_help_without_running(small_ckpt, tmp_path):
    done = cli("reshard", str(small_ckpt), str(tmp_path / "dst"), "--model_parallel_size", "1", "--help")
    assert done.returncode == 0 and "MODEL_PARALLEL_SIZE" in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []
