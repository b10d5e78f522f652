"""What the command-line entry points share: `Llama.build`'s options as flags, every flag checked before any work,
errors as one line, and output from the first process.

    @with_build_options(max_seq_len=128)
    def main(build_options: dict, temperature: float = 0.6) -> None:
        llama = Llama.build(**build_options)

    if __name__ == "__main__":
        run(main)

gives `main` the flags --ckpt_dir, --tokenizer_path, --max_seq_len (here defaulting to 128), ... --compile, listed by
--help beside its own. Before `main` runs, misspelt flags, values of the wrong type or range, unknown devices and
dtypes, and a checkpoint folder without params.json or shards are refused with `error: ...` and exit status 2;
other anticipated failures exit with status 1. `LLAMA_DEBUG=1` shows the traceback instead.
"""

import contextlib
import functools
import inspect
import os
import sys
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

from llama.args import ModelArgs
from llama.checkpoint.load import check_world_size, read_params, shard_paths
from llama.command_line import ANTICIPATED, UsageError, bind_arguments, rank, report
from llama.generation import Llama
from llama.sampling import check_int, check_sampling
from llama.validation import check_build_values


_BUILD_DEFAULTS = {p.name: p.default for p in inspect.signature(Llama.build).parameters.values()
                   if p.default is not inspect.Parameter.empty}


def with_build_options(exclude: Iterable[str] = (), check: Optional[Callable[..., None]] = None,
                       **defaults) -> Callable[[Callable], Callable]:
    """Decorate `main(build_options, **own_flags)` into a command that also takes `Llama.build`'s arguments as flags
    (all but those in `exclude`; `defaults` replaces their defaults) and passes them on as the dict `build_options`.

    Every flag's value is checked against its type hint, then `Llama.build`'s values and files, then `check(**flags)`
    (main's own ranges), before `main` runs; what fails raises UsageError.
    """
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
            flags = _checked_flags(signature, *args, **kwargs)
            build_options = {k: v for k, v in flags.items() if k in build_names}
            with _as_usage_errors():
                _check_build_options({**_BUILD_DEFAULTS, **build_options})
                if check is not None:
                    check(**flags)
            return main(build_options, **{k: v for k, v in flags.items() if k not in build_names})

        command.__signature__ = signature
        return command

    return decorate


def _checked_flags(signature: inspect.Signature, *args, **kwargs) -> dict[str, Any]:
    """The flags' values by name (defaults filled in), each converted to or checked against its type hint."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return {name: _typed(name, value, signature.parameters[name].annotation) for name, value in bound.arguments.items()}


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` of flag `name` as its type hint wants it: fire parses `--system 42` as an int where text is meant."""
    kinds = _kinds(hint)
    textual = {str, os.PathLike, Path} | {k for k in kinds if getattr(k, "__module__", "") == "torch"}
    if (value is None and type(None) in kinds) or hint is inspect.Parameter.empty:
        return value
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int) and (int in kinds or float in kinds):
        return value
    elif isinstance(value, float) and float in kinds:
        return value
    elif isinstance(value, str) and kinds & textual:
        return value
    elif isinstance(value, (int, float)) and kinds & textual:
        return str(value)
    raise UsageError(f"--{name} must be {_wanted(hint)}, got {value!r}")


def _kinds(hint: Any) -> set:
    """The types a type hint admits: the members of a union, or the hint itself."""
    return set(typing.get_args(hint)) or {hint}


def _wanted(hint: Any) -> str:
    """What a value of type `hint` is, in words."""
    return " or ".join(sorted({"an integer" if k is int else "a number" if k is float else "true or false"
                               if k is bool else "nothing (None)" if k is type(None) else "text"
                               for k in _kinds(hint)}))


def _check_build_options(options: dict[str, Any]) -> None:
    """`Llama.build`'s values, and the checkpoint folder for this many processes, checked without loading anything."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_build_values(*(options[k] for k in ("max_seq_len", "max_batch_size", "model_parallel_size", "seed",
                                              "device", "dtype", "quantize", "compile")))
    if options["model_parallel_size"] not in (None, world_size):
        raise UsageError(f"--model_parallel_size {options['model_parallel_size']} but {world_size} processes were "
                         f"launched (torchrun --nproc_per_node {options['model_parallel_size']}, or omit it)")
    ckpt_dir = Path(options["ckpt_dir"])
    with warnings.catch_warnings():  # Llama.build warns about params.json later, once
        warnings.simplefilter("ignore")
        args = ModelArgs.from_params(read_params(ckpt_dir))
    check_world_size(ckpt_dir, args, len(shard_paths(ckpt_dir)), world_size)
    tokenizer = options["tokenizer_path"] or ckpt_dir / "tokenizer.model"
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer} (pass --tokenizer_path)")


@contextlib.contextmanager
def _as_usage_errors() -> Iterator[None]:
    """Re-raise ValueError and FileNotFoundError as UsageError: inside, they come from checking flags."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def run(command: Callable, name: Optional[str] = None) -> None:
    """Run `command` with fire as this process's entry point: flag names checked first, errors as one line."""
    import fire  # only entry points need it

    argv = sys.argv[1:]
    try:
        if "-h" in argv or "--help" in argv:
            argv = ["--help"]  # fire would run the command with the other arguments first
        else:
            parameters = inspect.signature(command).parameters
            bind_arguments(name or Path(sys.argv[0]).name, argv, dict(parameters),
                           lambda flag: _wanted(parameters[flag].annotation))
        fire.Fire(command, command=argv, name=name)
    except Exception as error:  # noqa: BLE001 - every failure ends in one line, unless LLAMA_DEBUG asks otherwise
        if os.environ.get("LLAMA_DEBUG") or not isinstance(error, ANTICIPATED):
            raise
        sys.exit(report(error))
    except KeyboardInterrupt:
        sys.exit(130)


def check_generation_flags(temperature: Any, top_p: Any, max_gen_len: Any, **_: Any) -> None:
    """The example scripts' own flags: sampling, and max_gen_len >= 0 (None: up to max_seq_len)."""
    check_sampling(temperature, top_p)
    check_int("max_gen_len", max_gen_len, minimum=0, optional=True)


def is_first_process() -> bool:
    """Whether this is the process that talks to the user (rank 0 under torchrun, or the only one)."""
    return rank() == 0


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
