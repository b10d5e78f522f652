"""What Llama's command lines (the example scripts, the chat, the server) share: `Llama.build`'s options as flags,
checked with the checkpoint folder before any work, and output from the first process.

    @with_build_options(max_seq_len=128)
    def main(build_options: dict, temperature: float = 0.6) -> None:
        llama = Llama.build(**build_options)

    if __name__ == "__main__":
        run(main)  # llama.fire_commands.run

gives `main` the flags --ckpt_dir, --tokenizer_path, --max_seq_len (here defaulting to 128), ... --prefix_reuse, listed by
--help beside its own. Before `main` runs, misspelt flags, values of the wrong type or range, unknown devices and
dtypes, and a checkpoint folder without params.json or shards are refused with `error: ...` and exit status 2;
other anticipated failures exit with status 1. `LLAMA_DEBUG=1` shows the traceback instead.
"""

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

from llama.args import ModelArgs
from llama.checkpoint.load import check_world_size, read_params, shard_paths
from llama.fire_commands import UsageError, checked_flags, rank, usage_errors
from llama.generation import Llama
from llama.sampling import check_int, check_sampling
from llama.validation import check_build_values, check_quantize_shapes


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
            flags = checked_flags(signature, *args, **kwargs)
            build_options = {k: v for k, v in flags.items() if k in build_names}
            with usage_errors():
                _check_build_options({**_BUILD_DEFAULTS, **build_options})
                if check is not None:
                    check(**flags)
            return main(build_options, **{k: v for k, v in flags.items() if k not in build_names})

        command.__signature__ = signature
        return command

    return decorate


def _check_build_options(options: dict[str, Any]) -> None:
    """`Llama.build`'s values, and the checkpoint folder for this many processes, checked without loading anything."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_build_values(*(options[k] for k in ("max_seq_len", "max_batch_size", "model_parallel_size", "seed",
                                              "device", "dtype", "quantize", "compile", "prompt_lookup",
                                              "prefix_reuse")))
    if options["model_parallel_size"] not in (None, world_size):
        raise UsageError(f"--model_parallel_size {options['model_parallel_size']} but {world_size} processes were "
                         f"launched (torchrun --nproc_per_node {options['model_parallel_size']}, or omit it)")
    ckpt_dir = Path(options["ckpt_dir"])
    with warnings.catch_warnings():  # Llama.build warns about params.json later, once
        warnings.simplefilter("ignore")
        args = ModelArgs.from_params(read_params(ckpt_dir))
    check_world_size(ckpt_dir, args, len(shard_paths(ckpt_dir)), world_size)
    check_quantize_shapes(options["quantize"], args, world_size)
    tokenizer = options["tokenizer_path"] or ckpt_dir / "tokenizer.model"
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer} (pass --tokenizer_path)")


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
