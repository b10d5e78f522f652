"""`python -m llama.chat`: history, commands, trimming, and clean exits through a pipe, a terminal and torchrun."""

import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from llama import chat
from llama.generation import Llama

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _type_lines(monkeypatch, *lines: str) -> list[str]:
    """Make input() return `lines`, then raise EOFError as at Ctrl-D; returns the lines not yet read."""
    pending = list(lines)

    def fake_input(prompt: str = "") -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    monkeypatch.setattr("builtins.input", fake_input)
    return pending


def test_fit_history_drops_oldest_turns_but_never_the_system_prompt(chat_format):
    system = _message("system", "Be brief.")
    turns = [_message(r, f"message number {i}") for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    everything = len(chat_format.encode_dialog_prompt([system, *turns]))
    assert chat.fit_history(chat_format, [system, *turns], everything) == ([system, *turns], 0)

    kept, dropped = chat.fit_history(chat_format, [system, *turns], everything - 1)
    assert (kept, dropped) == ([system, *turns[2:]], 2)  # a whole user/assistant pair goes
    assert len(chat_format.encode_dialog_prompt(kept)) <= everything - 1

    last_only = len(chat_format.encode_dialog_prompt([system, turns[-1]]))
    assert chat.fit_history(chat_format, [system, *turns], last_only) == ([system, turns[-1]], 6)
    with pytest.raises(ValueError, match="more than the"):
        chat.fit_history(chat_format, [system, *turns], last_only - 1)
    assert chat.fit_history(chat_format, turns, last_only - 1)[1] == 6  # no system prompt: all but the last go


def test_conversation_keeps_history_and_obeys_commands(tiny_checkpoint, monkeypatch, capsys):
    unread = _type_lines(monkeypatch, "Hello", "/system Be brief.", "Tell me more", "/bogus", "/reset", "Again",
                         "/exit", "not read")
    dialogs = []

    def fake_stream_chat(self, dialog, temperature, top_p, max_gen_len):
        dialogs.append([dict(m) for m in dialog])
        return iter(["Reply ", str(len(dialogs))])

    monkeypatch.setattr(Llama, "stream_chat", fake_stream_chat)
    chat.main(str(tiny_checkpoint(1)), device="cpu", dtype="float32", max_seq_len=256)
    assert dialogs == [
        [_message("user", "Hello")],
        [
            _message("system", "Be brief."),
            _message("user", "Hello"),
            _message("assistant", "Reply 1"),
            _message("user", "Tell me more"),
        ],
        [_message("system", "Be brief."), _message("user", "Again")],  # /reset keeps the system prompt
    ]
    assert unread == ["not read"]
    out = capsys.readouterr().out
    assert "Assistant: Reply 1\n" in out and "[unknown command /bogus]" in out and "/reset" in out


def test_long_history_is_trimmed_with_a_notice(tiny_checkpoint, monkeypatch, capsys):
    _type_lines(monkeypatch, "/system Keep this.", *[f"Question {i} with some words" for i in range(6)])
    prompts = []

    def fake_stream_chat(self, dialog, temperature, top_p, max_gen_len):
        prompts.append((len(self.formatter.encode_dialog_prompt(dialog)), dialog[0]["content"], max_gen_len))
        return iter(["An answer of several words."])

    monkeypatch.setattr(Llama, "stream_chat", fake_stream_chat)
    chat.main(str(tiny_checkpoint(1)), device="cpu", dtype="float32", max_seq_len=128, max_gen_len=40)
    assert len(prompts) == 6
    assert all(length <= 128 - 40 and first == "Keep this." and room == 40 for length, first, room in prompts)
    assert "[dropped the 2 oldest messages to leave 40 tokens for the reply within max_seq_len=128]" in (
        capsys.readouterr().out
    )


def test_a_message_too_long_to_answer_is_refused(tiny_checkpoint, monkeypatch, capsys):
    _type_lines(monkeypatch, "word " * 100)
    monkeypatch.setattr(Llama, "stream_chat", lambda *args, **kwargs: pytest.fail("nothing should be generated"))
    chat.main(str(tiny_checkpoint(1)), device="cpu", dtype="float32", max_seq_len=64)
    assert "[message not sent: the prompt needs" in capsys.readouterr().out


def test_bad_max_gen_len_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_gen_len"):
        chat.main(str(tiny_checkpoint(1)), max_seq_len=64, max_gen_len=64)


def test_two_processes_through_a_pipe_reply_as_one_process_does(tiny_checkpoint, build_tiny):
    expected = "".join(build_tiny(max_seq_len=128, max_batch_size=1).stream_chat(
        [_message("user", "Hello there")], temperature=0, max_gen_len=12))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "llama.chat", f"--ckpt_dir={tiny_checkpoint(2)}", "--device=cpu", "--dtype=float32",
               "--max_seq_len=128", "--max_gen_len=12", "--temperature=0"]
    result = subprocess.run(command, input="Hello there\n", cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Only the first process prints; the input ended (EOF), so the chat ended on its own.
    assert result.stdout.count("Assistant: ") == 1
    assert f"You: Hello there\nAssistant: {expected}\nYou: \n" in result.stdout


class Terminal:
    """A process on its own pseudo-terminal (its controlling terminal), so Ctrl-C and Ctrl-D act as typed."""

    def __init__(self, command: list[str]):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=_env(), start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.output = ""

    def expect(self, text: str, timeout: float = 120) -> None:
        """Read until `text` has appeared after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"timed out waiting for {text!r}; got {self.output[-2000:]!r}"
            self.output += os.read(self.master, 4096).decode(errors="replace")
        self.output = self.output[self.output.index(text) + len(text) :]

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def finish(self) -> tuple[int, str]:
        """Wait for the exit status; return it with everything printed since the last `expect`."""
        returncode = self.process.wait(timeout=60)
        while select.select([self.master], [], [], 0)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # Linux reports the closed terminal as EIO
                break
            if not data:
                break
            self.output += data.decode(errors="replace")
        os.close(self.master)
        return returncode, self.output


@pytest.mark.parametrize("key", ["ctrl-d at the prompt", "ctrl-c at the prompt", "ctrl-c during a reply"])
def test_terminal_session_exits_cleanly(tiny_checkpoint, key):
    terminal = Terminal([sys.executable, "-m", "llama.chat", f"--ckpt_dir={tiny_checkpoint(1)}", "--device=cpu",
                         "--max_seq_len=2048", "--max_gen_len=" + ("1500" if "reply" in key else "6")])
    terminal.expect("You: ")
    terminal.type("Hello\r")
    terminal.expect("Assistant: ")
    if "reply" in key:
        time.sleep(1)  # the reply is being written: 1500 tokens take far longer
    else:
        terminal.expect("You: ")
    terminal.type("\x04" if "ctrl-d" in key else "\x03")
    returncode, output = terminal.finish()
    assert returncode == 0 and "Traceback" not in output, output
