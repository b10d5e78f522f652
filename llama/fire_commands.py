"""Functions run as fire commands: the command line checked before fire runs anything, errors as one line.

fire binds what it understands, runs the command, and only then complains about the rest (a misspelt flag), or
prints its usage for a missing argument; `bind_arguments` finds both first, naming what would be valid, and
`checked_flags` gives each value the type its hint asks for. `exit_status` is every entry point's guard: an
anticipated failure ends in one line on stderr and exit status 2 (a bad command line) or 1 (the work failed);
`LLAMA_DEBUG=1` shows the traceback instead.
"""

import contextlib
import difflib
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import fire


class UsageError(ValueError):
    """A bad command line (a flag, or a value given to one): exit status 2."""


# Failures an entry point reports in one line (anything else is a bug, and keeps its traceback).
ANTICIPATED = (ValueError, TypeError, OSError, RuntimeError)


def rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    return int(os.environ.get("RANK", 0))


def report(error: Exception) -> int:
    """Say `error` in one line on stderr and return the exit status: 2 for a bad command line, else 1.

    Under torchrun every process checks the same command line, so only the first says what is wrong with it; a
    failure while working may hit one process alone, so each says its own, with its rank.
    """
    if isinstance(error, BrokenPipeError):  # stdout was closed (`| head`): nothing more can be printed there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: standard output was closed", file=sys.stderr)
        return 1
    usage, message = isinstance(error, UsageError), str(error).replace("\n", " ")
    if rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    elif not usage:
        print(f"error (rank {rank()}): {message}", file=sys.stderr)
    return 2 if usage else 1


def exit_status(work: Callable[[], Any]) -> int:
    """Run `work` and return the process's exit status: 0, `report`'s for an anticipated failure, 130 for Ctrl-C.

    With LLAMA_DEBUG set the exception goes on instead, with its traceback.
    """
    try:
        work()
    except (*ANTICIPATED, KeyboardInterrupt) as error:  # anything else is a bug, and keeps its traceback
        if os.environ.get("LLAMA_DEBUG"):
            raise
        if not isinstance(error, KeyboardInterrupt):
            return report(error)
        if rank() == 0:  # every process was interrupted; one line says so
            print("error: interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Re-raise ValueError and FileNotFoundError as UsageError: inside, they come from checking flags."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def _is_flag(arg: str) -> bool:
    return arg.startswith("--") or re.match(r"-[a-zA-Z]", arg) is not None  # as fire tells -x from -1


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]}? " if close else ""


def _flag_name(command: str, arg: str, key: str, params: dict, describe: Callable[[str], str],
               alone: bool) -> tuple[str, Optional[str]]:
    """The parameter that flag `arg` (key: its name without dashes) sets, and its implied value if it has one."""
    flags = [f"--{name}" for name in params]
    matches = [name for name in params if name.startswith(key)] if len(key) == 1 else []
    if key in params:
        name = key
    elif alone and key.startswith("no") and isinstance(getattr(params.get(key[2:]), "default", None), bool):
        return key[2:], "False"
    elif len(matches) == 1:
        name = matches[0]  # fire's one-letter shortcut for the only parameter starting with that letter
    elif matches:
        raise UsageError(f"-{key} is ambiguous (could be {' or '.join('--' + m for m in matches)})")
    else:
        flag = arg.split("=", 1)[0]
        raise UsageError(f"unknown flag {flag} for {command} ({suggest('--' + key, flags)}valid: {', '.join(flags)})")
    if not alone:
        return name, None
    if not isinstance(params[name].default, bool):
        raise UsageError(f"--{name} needs a value ({describe(name)})")
    return name, "True"


def bind_arguments(command: str, args: list[str], params: dict, describe: Callable[[str], str]) -> dict[str, str]:
    """{parameter: value as typed} from fire's forms: VALUE (for the parameters without a default, in order),
    --name VALUE, --name=VALUE, --name and --noname for a True/False flag, -n for the only parameter starting with n."""
    given, positional, i = {}, [], 0
    while i < len(args):
        arg, i = args[i], i + 1
        if arg in ("-", "--"):
            raise UsageError(f"argument {arg!r} is not supported ({command} runs once; fire's chaining and its own "
                             "flags do not apply)")
        if not _is_flag(arg):
            positional.append(arg)
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        name, implied = _flag_name(command, arg, key.replace("-", "_"), params, describe,
                                   alone=not has_value and (i == len(args) or _is_flag(args[i])))
        if name in given:
            raise UsageError(f"--{name} given twice")
        if implied is not None:
            value = implied
        elif not has_value:  # --name VALUE
            value, i = args[i], i + 1
        given[name] = value
    required = [name for name, p in params.items() if p.default is inspect.Parameter.empty]
    usage = " ".join([command, *(name.upper() for name in required)]
                     + [f"[--{name}]" for name in params if name not in required])
    open_slots = [name for name in required if name not in given]
    if len(positional) > len(open_slots):
        raise UsageError(f"unexpected argument {positional[len(open_slots)]!r} (usage: {usage})")
    given.update(zip(open_slots, positional))
    if len(positional) < len(open_slots):
        raise UsageError(f"{command} needs {' '.join(n.upper() for n in open_slots[len(positional):])} "
                         f"(usage: {usage})")
    return given


def checked_flags(signature: inspect.Signature, *args, **kwargs) -> dict[str, Any]:
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


def run(command: Callable, name: Optional[str] = None) -> None:
    """Run `command` with fire as this process's entry point, flag names checked first, and exit with
    `exit_status`'s status."""
    sys.exit(exit_status(lambda: _fire(command, sys.argv[1:], name)))


def _fire(command: Callable, argv: list[str], name: Optional[str]) -> None:
    """Check `argv`'s flags against `command`'s signature, then let fire run it (or show its help)."""
    if "-h" in argv or "--help" in argv:
        argv = ["--help"]  # fire would run the command with the other arguments first
    else:
        parameters = inspect.signature(command).parameters
        bind_arguments(name or Path(sys.argv[0]).name, argv, dict(parameters),
                       lambda flag: _wanted(parameters[flag].annotation))
    fire.Fire(command, command=argv, name=name)
