"""`python -m llama.checkpoint random|reshard|from_hf|to_hf|from_gguf`: write, reshard and convert checkpoints.

The command line is checked against the command's signature before anything runs. Errors print one line,
`error: <what> (<what would be valid>)`, on stderr: exit status 2 for a bad command line (an unknown flag, a missing
argument, a bad value), 1 for bad input found while working (a missing folder, a wrong shape, a taken destination).
With LLAMA_DEBUG=1 the traceback is shown instead.
"""

import inspect
import sys
from collections.abc import Callable
from typing import Optional

import fire
from fire.parser import DefaultParseValue

from llama.args import PRESETS
from llama.checkpoint.gguf import convert_from_gguf
from llama.checkpoint.hf import convert_from_hf, convert_to_hf, parse_size
from llama.checkpoint.random_weights import write_random_checkpoint
from llama.checkpoint.reshard import reshard_checkpoint
from llama.devices import parse_dtype
from llama.fire_commands import UsageError, bind_arguments, exit_status, suggest

# Paths and names reach the commands as typed: fire would otherwise make '1e3' the float 1000.0.
_as_typed = fire.decorators.SetParseFns(src=str, dst=str, hf_dir=str, file=str, preset=str, dtype=str,
                                        max_shard_size=str)


@_as_typed
def random(
    dst: str,
    preset: str = "tiny",
    model_parallel_size: int = 1,
    seed: int = 0,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> str:
    """Write a random-weight checkpoint in Meta's layout to DST (preset: tiny, 1B, 3B, 8B or 70B)."""
    return str(write_random_checkpoint(dst, preset, model_parallel_size, seed, dtype, overwrite))


@_as_typed
def reshard(src: str, dst: str, model_parallel_size: int, overwrite: bool = False) -> str:
    """Rewrite checkpoint SRC as MODEL_PARALLEL_SIZE shards in DST (a divisor or multiple of its shard count)."""
    return str(reshard_checkpoint(src, dst, model_parallel_size, overwrite))


@_as_typed
def from_hf(hf_dir: str, dst: str, model_parallel_size: int = 1, overwrite: bool = False) -> str:
    """Convert the HF Llama folder HF_DIR (config.json + safetensors) to a Meta checkpoint of K shards in DST."""
    return str(convert_from_hf(hf_dir, dst, model_parallel_size, overwrite))


@_as_typed
def to_hf(src: str, dst: str, max_shard_size: str = "5GB", overwrite: bool = False) -> str:
    """Convert the Meta checkpoint SRC to an HF LlamaForCausalLM folder DST (config.json, safetensors, tokenizer)."""
    return str(convert_to_hf(src, dst, max_shard_size, overwrite))


@_as_typed
def from_gguf(file: str, dst: str, model_parallel_size: int = 1, dtype: str = "bfloat16",
              overwrite: bool = False, dequantize: bool = False) -> str:
    """Convert FILE, a GGUF file of llama.cpp's llama architecture (Llama 3, or another byte-level BPE
    vocabulary such as SmolLM2's), to a checkpoint of K shards in DST: quantized weights kept in GGUF's blocks
    (K-quants converted once, the error printed), the others cast to DTYPE; with --dequantize, every tensor
    dequantized and cast to DTYPE in Meta's layout. Plus tokenizer.model (and tokenizer_info.json for a vocabulary
    other than Llama 3's). Needs the gguf package (pip install -e ".[gguf]")."""
    return str(convert_from_gguf(file, dst, model_parallel_size, dtype, overwrite, dequantize))


# Subcommands of `python -m llama.checkpoint`; add new ones here.
COMMANDS = {"random": random, "reshard": reshard, "from_hf": from_hf, "to_hf": to_hf, "from_gguf": from_gguf}


def _integer(minimum: int) -> Callable[[str], bool]:
    def accepts(raw: str) -> bool:
        value = DefaultParseValue(raw)  # as fire will read it
        return type(value) is int and value >= minimum  # not a bool, float or string

    return accepts


def _parses(parse: Callable) -> Callable[[str], bool]:
    def accepts(raw: str) -> bool:
        try:
            parse(raw)
        except ValueError:
            return False
        return True

    return accepts


# What each parameter accepts, as typed on the command line, and how to say it.
_VALUES: dict[str, tuple[Callable[[str], bool], str]] = {
    **dict.fromkeys(("src", "dst", "hf_dir"), (lambda raw: raw != "", "a folder")),
    "file": (lambda raw: raw != "", "a file path"),
    "preset": (lambda raw: raw in PRESETS, f"one of {', '.join(PRESETS)}"),
    "model_parallel_size": (_integer(1), "an integer >= 1"),
    "seed": (_integer(0), "an integer >= 0"),
    "dtype": (_parses(parse_dtype), "one of float32, bfloat16, float16"),
    "max_shard_size": (_parses(parse_size), "a positive number of bytes or a size like 5GB or 500MB"),
    **dict.fromkeys(("overwrite", "dequantize"), (lambda raw: raw.lower() in ("true", "false"), "True or False")),
}


def _rule(name: str) -> tuple[Callable[[str], bool], str]:
    return _VALUES.get(name, (lambda raw: True, "a value"))  # a parameter without a rule takes any value


def _describe(name: str) -> str:
    return _rule(name)[1]


def check_command_line(argv: list[str]) -> list[str]:
    """The command line for fire, once `argv` was checked against the chosen command's signature.

    Raises UsageError for an unknown command or flag, a missing or extra argument, or a bad value. Asking for help
    anywhere gives just the command's help (fire would run the command first); otherwise every argument is passed on
    as --name=value, so that fire binds exactly what was checked.
    """
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = suggest(command, list(COMMANDS))
        raise UsageError(f"unknown command {command!r} ({hint}valid: {', '.join(COMMANDS)})")
    if "-h" in args or "--help" in args:
        return [command, "--help"]
    given = bind_arguments(command, args, dict(inspect.signature(COMMANDS[command]).parameters), _describe)
    for name, value in given.items():
        accepts, what = _rule(name)
        if not accepts(value):
            raise UsageError(f"--{name} must be {what}, got {value!r}")
        if name in ("overwrite", "dequantize"):
            given[name] = value.capitalize()  # true -> True: fire reads only the capitalized words as bools
    return [command, *(f"--{name}={value}" for name, value in given.items())]


def main(argv: Optional[list[str]] = None) -> int:
    """Run `python -m llama.checkpoint` on `argv` (default: sys.argv[1:]) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # name: not argv[0], with which fire's help would name __main__.py
    return exit_status(lambda: fire.Fire(COMMANDS, command=check_command_line(argv), name="llama.checkpoint"))


if __name__ == "__main__":
    sys.exit(main())
