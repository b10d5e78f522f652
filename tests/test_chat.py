"""`python -m llama.chat`: history, commands, trimming, and clean exits through a pipe, a terminal and torchrun."""

import codecs
import fcntl
import os
import select
import signal
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


@pytest.fixture(scope="module")
def greedy_reply(build_tiny) -> str:
    """What one process replies to "Hello there", greedily, in at most 6 tokens."""
    llama = build_tiny(max_seq_len=128, max_batch_size=1)
    return "".join(llama.stream_chat([_message("user", "Hello there")], temperature=0, max_gen_len=6))


def _chat_command(checkpoint: Path, nproc: int, max_gen_len: int) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    # A short max_seq_len keeps the tiny model quick: attention covers the whole cache.
    return [sys.executable, *launcher, "-m", "llama.chat", f"--ckpt_dir={checkpoint}", "--device=cpu",
            "--dtype=float32", "--temperature=0", f"--max_seq_len={max_gen_len + 64}", f"--max_gen_len={max_gen_len}"]


def test_a_piped_conversation_ends_at_the_end_of_input(tiny_checkpoint, greedy_reply):
    result = subprocess.run(_chat_command(tiny_checkpoint(1), 1, 6), input="Hello there\n/bogus\n", cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"You: Hello there\nAssistant: {greedy_reply}\nYou: /bogus\n[unknown command /bogus]" in result.stdout
    assert result.stdout.endswith("You: \n")


class Terminal:
    """A process on its own pseudo-terminal (its controlling terminal), so Ctrl-C and Ctrl-D act as typed."""

    def __init__(self, command: list[str]):
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=_env(), start_new_session=True,
            preexec_fn=self._as_in_a_shell,
        )
        os.close(slave)
        self.output = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # reads may split a character

    @staticmethod
    def _as_in_a_shell() -> None:
        """In the child: take the terminal as controlling terminal, and let Ctrl-C interrupt as it does for a
        command typed in a shell. (Tests started in the background, `pytest &`, inherit SIGINT ignored.)"""
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def _read(self, timeout: float) -> bool:
        """Add what the process printed within `timeout` seconds to `output`; False once the terminal is closed."""
        if not select.select([self.master], [], [], timeout)[0]:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # Linux reports a terminal that no process holds any more as EIO
            return False
        self.output += self._utf8.decode(data)
        return bool(data)

    def expect(self, text: str, timeout: float = 120) -> None:
        """Read until `text` has appeared after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"timed out waiting for {text!r}; got {self.output[-2000:]!r}"
            assert self._read(0.1), f"the process closed the terminal before printing {text!r}: {self.output!r}"
        self.output = self.output[self.output.index(text) + len(text) :]

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Read until the process exits (a full terminal would block its writes); return its status and output."""
        deadline = time.monotonic() + timeout
        while self._read(0.1) and time.monotonic() < deadline:
            pass
        returncode = self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return returncode, self.output


@pytest.mark.parametrize(
    ("nproc", "key"),
    [
        (1, "ctrl-d at the prompt"),
        (1, "ctrl-c during a reply"),
        # torchrun runs its workers in a session of their own, away from the terminal's Ctrl-C.
        (2, "ctrl-c at the prompt"),
        (2, "ctrl-c during a reply"),
    ],
)
def test_terminal_session_exits_cleanly(tiny_checkpoint, greedy_reply, nproc, key):
    during_reply = "reply" in key
    terminal = Terminal(_chat_command(tiny_checkpoint(nproc), nproc, 1500 if during_reply else 6))
    terminal.expect("You: ")
    terminal.type("Hello there\r")
    if during_reply:
        terminal.expect("Assistant: ")
        time.sleep(1)  # the reply is being written: 1500 tokens take far longer
    else:
        # The reply, streamed by the first process only, is what one process gives.
        terminal.expect(f"Assistant: {greedy_reply}".replace("\n", "\r\n") + "\r\nYou: ")
    terminal.type("\x04" if "ctrl-d" in key else "\x03")
    returncode, output = terminal.finish()
    assert returncode == 0 and "Traceback" not in output and "Assistant" not in output, output
