"""Bad input, as a hostile user would give it, is refused before any work with one clear line; library misuse
raises instead of corrupting; the chat survives what a terminal or a pipe can throw at it."""

import functools
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama import chat
from llama.devices import parse_device
from llama.fire_commands import UsageError
from llama.generation import Llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["example_text_completion", "example_chat_completion", "llama.chat"]
# Not a device this machine has: cuda when there is no GPU, else a GPU index past the last one.
MISSING_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture
def entry_point(monkeypatch, capsys):
    """`entry_point(module, *argv)`: run a command-line entry point in this process as `python module argv`;
    returns (exit status, stdout, stderr, whether Llama.build was reached)."""
    monkeypatch.syspath_prepend(str(ROOT))
    built = []
    original_build = Llama.build

    @functools.wraps(original_build)  # the same signature: the entry points take their flags from it
    def recording_build(*args, **kwargs):
        built.append(True)
        return original_build(*args, **kwargs)

    monkeypatch.setattr(Llama, "build", staticmethod(recording_build))

    def run(module: str, *argv: str) -> tuple[int, str, str, bool]:
        monkeypatch.setattr(sys, "argv", [module, *argv])
        status = 0
        try:
            importlib.import_module(module).run(importlib.import_module(module).main)
        except SystemExit as exit:
            status = exit.code
        out, err = capsys.readouterr()
        return status, out, err, bool(built)

    return run


BAD_FLAGS = [
    (["--max_seq_len", "abc"], "--max_seq_len must be an integer, got 'abc'"),
    (["--seed", "abc"], "--seed must be an integer"),
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--temperature", "abc"], "--temperature must be a number"),
    (["--top_p", "2"], r"top_p must be a number in \(0, 1\]"),
    (["--dtype", "int3"], "dtype must be one of float32, bfloat16, float16"),
    (["--dtype", "float8_e4m3fn"], "dtype must be one of float32, bfloat16, float16"),
    (["--quantize", "int3"], 'quantize must be None or "int8" or "int4"'),
    (["--device", MISSING_GPU], "not available|does not exist"),
    (["--device", "tpu"], "device"),
    (["--max_gen_lenn", "3"], r"unknown flag --max_gen_lenn .*\(did you mean --max_gen_len\?"),
    (["--model_parallel_size", "2"], "--model_parallel_size 2 but 1 processes were launched"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bad_flags_are_refused_in_one_line_before_loading(entry_point, tiny_checkpoint, script, argv, message):
    status, out, err, built = entry_point(script, "--ckpt_dir", str(tiny_checkpoint(1)), *argv)
    assert (status, built) == (2, False)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_checkpoint_folder_or_flag_is_a_usage_error(entry_point, tmp_path, script):
    status, _, err, built = entry_point(script, "--ckpt_dir", str(tmp_path / "nowhere"))
    assert (status, built, err) == (2, False, f"error: checkpoint folder not found: {tmp_path / 'nowhere'}\n")
    status, _, err, built = entry_point(script, "--max_seq_len", "64")
    assert (status, built) == (2, False) and err.startswith(f"error: {script} needs CKPT_DIR (usage: ")


def test_a_broken_checkpoint_is_a_runtime_error_in_one_line(entry_point, tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("params.json", "tokenizer.model"):
        (broken / name).write_bytes((tiny_checkpoint(1) / name).read_bytes())
    shard = (tiny_checkpoint(1) / "consolidated.00.pth").read_bytes()
    (broken / "consolidated.00.pth").write_bytes(b"\0" * 4096 + shard[4096:])  # full size, unreadable
    status, _, err, built = entry_point("example_text_completion", "--ckpt_dir", str(broken))
    assert (status, built) == (1, True)
    assert err.count("\n") == 1 and err.startswith("error: ") and "consolidated.00.pth is truncated or not a torch checkpoint" in err


def test_llama_debug_shows_the_traceback(entry_point, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("LLAMA_DEBUG", "1")
    with pytest.raises(UsageError, match="--max_seq_len must be an integer"):
        entry_point("example_text_completion", "--ckpt_dir", str(tiny_checkpoint(1)), "--max_seq_len", "abc")


def test_under_torchrun_one_process_says_it_and_no_worker_traceback(tiny_checkpoint):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "example_text_completion.py", "--ckpt_dir", str(tiny_checkpoint(2)), "--temperature", "abc"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert result.stderr.count("error: --temperature must be a number, got 'abc'") == 1
    # torchrun reports the failed worker with its own traceback; no worker prints one.
    assert "example_text_completion.py\", line" not in result.stderr and "llama/" not in result.stderr


def test_chat_takes_a_numeric_system_prompt_as_text(entry_point, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    status, out, err, _ = entry_point("llama.chat", "--ckpt_dir", str(tiny_checkpoint(1)), "--system", "42",
                                      "--max_seq_len", "64", "--max_gen_len", "4")
    assert status == 0 and err == ""
    assert "Assistant: " in out and "message not sent" not in out


def test_chat_survives_bytes_that_are_not_utf8(entry_point, tiny_checkpoint, monkeypatch):
    strict = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\xfe\n/exit\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", strict)
    status, out, err, _ = entry_point("llama.chat", "--ckpt_dir", str(tiny_checkpoint(1)), "--max_seq_len", "64",
                                      "--max_gen_len", "4")
    assert status == 0 and err == ""
    assert "You: caf\ufffd \ufffd\ufffd" in out and "Assistant: " in out


def test_chat_commands_with_stray_words_are_explained_not_run(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset now\n/exit please\n"))
    chat.main(str(tiny_checkpoint(1)), max_seq_len=64, max_gen_len=4)
    out = capsys.readouterr().out
    assert "[/reset takes nothing after it; type /reset alone]" in out
    assert "[/exit takes nothing after it; type /exit alone]" in out
    assert "conversation forgotten" not in out


def test_a_closed_stdout_ends_the_chat_with_one_line(tiny_checkpoint):
    command = [sys.executable, "-m", "llama.chat", "--ckpt_dir", str(tiny_checkpoint(1)), "--max_seq_len", "256",
               "--max_gen_len", "64"]
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.stdout.readline()  # then close it, as `| head -1` does
    process.stdout.close()
    _, err = process.communicate(b"hello\n" * 20, timeout=240)
    assert process.returncode == 1 and err.decode().strip().endswith("error: standard output was closed")
    assert b"Traceback" not in err


def test_devices_that_do_not_exist_are_refused_by_name(tiny_checkpoint):
    with pytest.raises(ValueError, match=f"device '{MISSING_GPU}' .*available here: cpu"):
        parse_device(MISSING_GPU)
    with pytest.raises(ValueError, match="not available|does not exist"):
        Llama.build(tiny_checkpoint(1), device=MISSING_GPU)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        Llama.build(tiny_checkpoint(1), device="cpu", dtype=torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=64, max_batch_size=2)


def test_any_integer_is_a_token_id_and_nothing_else(llama):
    expected, _ = llama.generate([[128000, 9906]], max_gen_len=3, temperature=0)
    for prompt in ([np.int64(128000), np.int32(9906)], np.array([128000, 9906]), torch.tensor([128000, 9906]),
                   [torch.tensor(128000), torch.tensor(9906)]):
        assert llama.generate([prompt], max_gen_len=3, temperature=0)[0] == expected
    for bad in ([128000, 9906.0], [128000, True], [128000, "9906"]):
        with pytest.raises(ValueError, match="not an integer"):
            llama.generate([bad], max_gen_len=3)
    assert llama.tokenizer.decode([np.int64(9906), torch.tensor(1917)]) == "Hello world"
    with pytest.raises(ValueError, match="token ids must be integers, got 1.7"):
        llama.tokenizer.decode([1.7])


def test_prompts_may_come_from_any_iterable(llama):
    expected = llama.text_completion(["Hello", "Hi"], temperature=0, max_gen_len=3)
    assert llama.text_completion((p for p in ["Hello", "Hi"]), temperature=0, max_gen_len=3) == expected
    dialogs = ([{"role": "user", "content": p}] for p in ["Hello"])
    assert len(llama.chat_completion(dialogs, temperature=0, max_gen_len=3)) == 1


def test_streams_and_other_generation_run_side_by_side(llama):
    def alone(prompt: str) -> str:
        return llama.text_completion([prompt], temperature=0, max_gen_len=6)[0]["generation"]

    expected = {p: alone(p) for p in ("Once upon a time", "Hi there")}
    first, second = (llama.stream_completion(p, temperature=0, max_gen_len=6) for p in expected)
    pieces: dict = {first: [], second: []}
    for _ in range(2):  # read interleaved, piece by piece
        pieces[first].append(next(first))
        pieces[second].append(next(second))
    # Other generation meanwhile waits for a free slot (two here), and disturbs neither the streams nor itself.
    assert llama.text_completion(["Hi there"], temperature=0, max_gen_len=6)[0]["generation"] == expected["Hi there"]
    pieces[first] += list(first)
    pieces[second] += list(second)
    assert ["".join(pieces[first]), "".join(pieces[second])] == list(expected.values())


def test_a_closed_or_dropped_stream_gives_its_slot_back(llama):
    stream = llama.stream_completion("Once upon a time", temperature=0, max_gen_len=30)
    next(stream)
    stream.close()
    next(llama.stream_completion("Once upon a time", max_gen_len=30))  # dropped unread: nobody can read it
    llama.text_completion(["Hi"], max_gen_len=2)  # the step it runs finishes both as cancelled
    assert llama.engine.running == [] and set(llama.engine.slots) == {None}
