"""Jinja chat templates (as GGUF files and Hugging Face tokenizers carry them), rendered so that each message's
content stays apart from the template's own text: the caller encodes the template's text with its special tokens
and the content as plain text, so typing a special token's text cannot end a turn."""

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Message i's content is rendered as this private-use character, i, and the character again; the template cannot
# tell it from text, so it shows where the content lands.
_MARK = "\ue000"
_PLACEHOLDER = re.compile(f"{_MARK}(\\d+){_MARK}")


def _raise_exception(message: str) -> None:
    raise ValueError(f"the chat template refuses the dialog: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Hugging Face's tojson: Jinja's own escapes <, >, & and ' for HTML, which a prompt must not get.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A Jinja chat template, rendered in a sandbox with `messages`, `bos_token`, `eos_token`,
    `add_generation_prompt=True` and any further variables (`tools`, ...), as Hugging Face's `apply_chat_template`
    does."""

    def __init__(self, source: str, bos_token: str, eos_token: str, name: str = "the chat template"):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
        environment.globals.update(raise_exception=_raise_exception,
                                   strftime_now=lambda fmt: datetime.now().strftime(fmt))
        environment.filters["tojson"] = _tojson
        try:
            self._template = environment.from_string(source)
            self._reads = jinja2.meta.find_undeclared_variables(environment.parse(source))
        except jinja2.TemplateError as error:
            raise ValueError(f"{name} is not a valid Jinja template: {error}") from None
        self._variables = {"bos_token": bos_token, "eos_token": eos_token, "add_generation_prompt": True}
        self.name = name

    def takes(self, variable: str) -> bool:
        """Whether the template reads `variable` (e.g. "tools") from its caller."""
        return variable in self._reads

    def render(self, messages: Sequence[dict], **variables: Any) -> str:
        """The prompt text of `messages` (each with `role` and `content`), ending with the assistant's cue."""
        try:
            return self._template.render(messages=list(messages), **self._variables, **variables)
        except ValueError:
            raise
        except Exception as error:  # any error raised while the template runs is the template's
            raise ValueError(f"{self.name} failed on this dialog: {type(error).__name__}: {error}") from None

    def segments(self, messages: Sequence[dict], **variables: Any) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, is_content) pieces in order: the template's own text, and each message's
        content as the template inserted it.

        Templates that insert content verbatim or stripped of surrounding whitespace are supported; one that
        changes it otherwise (e.g. upper-cases it) raises ValueError, since its content could not be kept apart.
        """
        marked = [{**message, "content": f"{_MARK}{i}{_MARK}"} for i, message in enumerate(messages)]
        parts = _PLACEHOLDER.split(self.render(marked, **variables))  # text, index, text, index, ..., text
        indices = [int(i) for i in parts[1::2]]
        if len(set(indices)) != len(indices):
            raise ValueError(f"{self.name} inserts a message's content more than once; this is not supported")
        expected = self.render(messages, **variables)
        texts = parts[::2]  # one more than the contents
        for transform in (str, str.strip):
            pieces = [(texts[0], False)]
            for i, text in zip(indices, texts[1:]):
                pieces += [(transform(messages[i]["content"]), True), (text, False)]
            if "".join(text for text, _ in pieces) == expected:
                return [(text, is_content) for text, is_content in pieces if text]
        raise ValueError(f"{self.name} changes message content other than by stripping whitespace; its content "
                         "could not be kept apart from the template's text, so it is not supported")
