"""What the command-line entry points share: `Llama.build`'s options as flags, and output from the first process.

    @with_build_options(max_seq_len=128)
    def main(build_options: dict, temperature: float = 0.6) -> None:
        llama = Llama.build(**build_options)

gives `main` the flags --ckpt_dir, --tokenizer_path, --max_seq_len (here defaulting to 128), ... --compile, listed by
--help beside its own, without each script repeating them.
"""

import functools
import inspect
import os
from collections.abc import Callable, Iterable

from llama.generation import Llama


def with_build_options(exclude: Iterable[str] = (), **defaults) -> Callable[[Callable], Callable]:
    """Decorate `main(build_options, **own_flags)` into a command that also takes `Llama.build`'s arguments as flags
    (all but those in `exclude`; `defaults` replaces their defaults) and passes them on as the dict `build_options`."""
    build_params = [p.replace(default=defaults.get(p.name, p.default))
                    for p in inspect.signature(Llama.build).parameters.values() if p.name not in exclude]
    build_names = {p.name for p in build_params}

    def decorate(main: Callable) -> Callable:
        own_params = list(inspect.signature(main).parameters.values())[1:]
        required = [p for p in build_params if p.default is inspect.Parameter.empty]
        optional = [p for p in build_params if p.default is not inspect.Parameter.empty]
        signature = inspect.Signature(required + own_params + optional)

        @functools.wraps(main)
        def command(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            build_options = {k: v for k, v in bound.arguments.items() if k in build_names}
            return main(build_options, **{k: v for k, v in bound.arguments.items() if k not in build_names})

        command.__signature__ = signature
        return command

    return decorate


def is_first_process() -> bool:
    """Whether this is the process that talks to the user (rank 0 under torchrun, or the only one)."""
    return int(os.environ.get("RANK", 0)) == 0


def say(*args, **kwargs) -> None:
    """`print`, on the first process only: under torchrun every process computes, one prints."""
    if is_first_process():
        print(*args, **kwargs)


def echo(pieces: Iterable[str]) -> str:
    """Print streamed text as it comes (first process only) and return all of it."""
    text = []
    for piece in pieces:
        text.append(piece)
        say(piece, end="", flush=True)
    return "".join(text)


def speed_line(n_prompt: int, n_generated: int, seconds: float) -> str:
    """'N prompt tokens, M generated tokens in S s: R tokens/s'."""
    return (f"{n_prompt} prompt tokens, {n_generated} generated tokens in {seconds:.2f} s: "
            f"{n_generated / seconds:.1f} tokens/s")
