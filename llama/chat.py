"""A conversation with an instruction-tuned model in the terminal, streamed, with history.

    python -m llama.chat --ckpt_dir Meta-Llama-3-8B-Instruct/
    torchrun --nproc_per_node 8 -m llama.chat --ckpt_dir Meta-Llama-3-70B-Instruct/

The first process reads what you type and shares it with the others; they compute each reply together.
"""

import os
import select
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch.distributed as dist

from llama.chat_format import ChatFormat, Message
from llama.cli import is_first_process, say, with_build_options
from llama.fire_commands import run
from llama.generation import Llama
from llama.sampling import check_sampling

HELP = (
    "Commands: /system <text> sets the system prompt (empty: none), /reset forgets the conversation, "
    "/exit quits (so do Ctrl-D and Ctrl-C)."
)


def fit_history(formatter: ChatFormat, messages: list[Message], max_prompt_len: int) -> tuple[list[Message], int]:
    """Drop the oldest turns until the dialog's prompt is at most `max_prompt_len` tokens.

    A leading system message is always kept; a turn is a message and, when one follows, the assistant's reply
    to it. Returns the kept messages and the number dropped. Raises ValueError when the system message and
    the last message alone are too long.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    # Each candidate is rendered whole: a chat template may render a message differently by its place.
    while (total := len(formatter.encode_dialog_prompt(system + turns[dropped:]))) > max_prompt_len:
        if len(turns) - dropped <= 1:
            raise ValueError(f"the prompt needs {total} tokens, more than the {max_prompt_len} it may use")
        step = 2 if turns[dropped + 1]["role"] == "assistant" and len(turns) - dropped > 2 else 1
        dropped += step
    return system + turns[dropped:], dropped


class Conversation:
    """The chat's state: an optional system prompt and the user/assistant messages since the last reset."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.history: list[Message] = []

    def dialog(self) -> list[Message]:
        system: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history


def _share(value, group: dist.ProcessGroup | None):
    """The first process's `value`, on every process."""
    if group is None:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0, group=group)
    return shared[0]


def _read_line(group: dist.ProcessGroup | None) -> str | None:
    """The next line typed on the first process (None at end of input or Ctrl-C), the same on every process."""
    line = None
    if dist.get_rank() == 0:
        try:
            line = input("You: ")
            if not sys.stdin.isatty():  # echo piped input, so the transcript reads like a conversation
                print(line)
        except (EOFError, KeyboardInterrupt):
            print()
    return _share(line, group)


@contextmanager
def _ctrl_c_as_a_key(fd: int) -> Iterator[None]:
    """While inside, Ctrl-C on the terminal `fd` is a key, not a signal; at the prompt it types /exit.

    torchrun starts its workers in a session of their own, so the SIGINT of a typed Ctrl-C would reach only
    torchrun, which kills every process and prints a traceback. As a key, the first process reads it instead.
    """
    import readline

    saved = termios.tcgetattr(fd)
    no_interrupt = termios.tcgetattr(fd)
    no_interrupt[6][termios.VINTR] = b"\0"  # the "disabled" character on Linux and macOS
    termios.tcsetattr(fd, termios.TCSANOW, no_interrupt)
    readline.parse_and_bind(r'"\C-c": "\C-e\C-u/exit\C-m"')  # end of line, erase it, type /exit, Enter
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


@contextmanager
def _watch_for_ctrl_c(fd: int | None) -> Iterator[Callable[[], bool]]:
    """While a reply is written, yield a check for whether Ctrl-C was typed on the terminal `fd` (None: never).

    Keys are read as they are typed (no line buffering, no echo); anything else typed meanwhile is discarded.
    """
    if fd is None:
        yield lambda: False
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)

    def pressed() -> bool:
        typed = b""
        while select.select([fd], [], [], 0)[0] and (keys := os.read(fd, 1024)):  # b"": the terminal is gone
            typed += keys
        return b"\x03" in typed

    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _reply_len(max_gen_len: int | None, max_seq_len: int) -> int:
    return max_seq_len // 4 if max_gen_len is None else max_gen_len


def _check_flags(temperature: float, top_p: float, max_gen_len: int | None, max_seq_len: int, **_) -> None:
    check_sampling(temperature, top_p)
    if not 0 < _reply_len(max_gen_len, max_seq_len) < max_seq_len:
        raise ValueError(f"max_gen_len must be an int in [1, max_seq_len={max_seq_len}), got {max_gen_len!r}")


@with_build_options(exclude=("max_batch_size",), check=_check_flags, max_seq_len=2048)
def main(
    build_options: dict,
    system: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int | None = None,
) -> None:
    """Chat with the model in CKPT_DIR. Each reply may use up to `max_gen_len` tokens (default: a quarter of
    `max_seq_len`); the oldest turns are dropped, never the system prompt, when the history leaves less room."""
    reply_len = _reply_len(max_gen_len, build_options["max_seq_len"])
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD instead of ending the chat
        sys.stdin.reconfigure(errors="replace")
    llama = Llama.build(**build_options, max_batch_size=1)
    llama.formatter.check_supported()  # before the conversation, not as the answer to its first message
    is_first = is_first_process()
    # Other processes wait for the first one's input as long as the user thinks: a gloo group without the
    # default collective timeout, which would otherwise end an idle chat after some minutes.
    group = dist.new_group(backend="gloo", timeout=timedelta(days=365)) if dist.get_world_size() > 1 else None
    if is_first and sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    # The first of several processes reading a terminal takes Ctrl-C as a key (see _ctrl_c_as_a_key).
    terminal = sys.stdin.fileno() if is_first and group is not None and sys.stdin.isatty() else None

    chat = Conversation(system)
    say(HELP)
    try:
        with _ctrl_c_as_a_key(terminal) if terminal is not None else nullcontext():
            _converse(llama, chat, group, terminal, temperature, top_p, reply_len)
    except KeyboardInterrupt:  # one process: Ctrl-C while a reply is being written
        say()


def _converse(
    llama: Llama,
    chat: Conversation,
    group: dist.ProcessGroup | None,
    terminal: int | None,
    temperature: float,
    top_p: float,
    reply_len: int,
) -> None:
    """Answer lines until /exit, the end of input or Ctrl-C."""
    max_seq_len = llama.model.args.max_seq_len
    while (line := _read_line(group)) is not None:
        line = line.strip()
        command, _, argument = line.partition(" ")
        if command in ("/exit", "/quit", "/reset") and argument.strip():
            say(f"[{command} takes nothing after it; type {command} alone]")
        elif command in ("/exit", "/quit"):
            break
        elif command == "/reset":
            chat.history.clear()
            say("[conversation forgotten; the system prompt stays]")
        elif command == "/system":
            chat.system = argument.strip() or None
            say(f"[system prompt: {chat.system!r}]" if chat.system else "[no system prompt]")
        elif line.startswith("/"):
            say(f"[unknown command {command}] {HELP}")
        elif line:
            chat.history.append({"role": "user", "content": line})
            try:
                dialog, dropped = fit_history(llama.formatter, chat.dialog(), max_seq_len - reply_len)
            except ValueError as error:
                chat.history.pop()
                say(f"[message not sent: {error}; shorten it or the system prompt, or raise --max_seq_len]")
                continue
            if dropped:
                chat.history = chat.history[dropped:]
                say(f"[dropped the {dropped} oldest messages to leave {reply_len} tokens for the reply "
                    f"within max_seq_len={max_seq_len}]")
            say("Assistant: ", end="", flush=True)
            reply, interrupted = [], False
            with _watch_for_ctrl_c(terminal) as ctrl_c_pressed:
                for piece in llama.stream_chat(dialog, temperature, top_p, max_gen_len=reply_len):
                    reply.append(piece)
                    say(piece, end="", flush=True)
                    # Several processes all stop after the same piece: the first one decides.
                    if group is not None and (interrupted := _share(ctrl_c_pressed(), group)):
                        break
            say()
            if interrupted:
                return
            chat.history.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    run(main)
