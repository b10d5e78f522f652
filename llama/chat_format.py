"""The Llama 3 chat format: messages (with Llama 3.1 tool use) rendered as prompt tokens."""

from collections.abc import Sequence
from typing import Literal, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython", "tool"]
ROLES = ("system", "user", "assistant", "ipython", "tool")


class Message(TypedDict, total=False):
    """One chat message. `role` and `content` are required; the rest serve Llama 3.1 tool use.

    - `python_tag` (assistant only): the content is a tool call; it is preceded by `<|python_tag|>`.
    - `eom` (assistant only): end with `<|eom_id|>` instead of `<|eot_id|>`: the assistant awaits a tool result,
      which comes back as an `ipython` (alias `tool`) message.
    """

    role: Role
    content: str
    python_tag: bool
    eom: bool


Dialog = Sequence[Message]

_MESSAGE_KEYS = {"role", "content", "python_tag", "eom"}


def validate_message(message: Message, index: int = 0) -> None:
    """Raise ValueError naming `index` when `message` is not a well-formed Message."""
    where = f"message {index}"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
    unknown = sorted(set(message) - _MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys are {sorted(_MESSAGE_KEYS)}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where} has role {role!r}; valid roles are {', '.join(ROLES)}")
    if not isinstance(message.get("content"), str):
        raise ValueError(f"{where} content must be a str, got {type(message.get('content')).__name__}")
    for flag in ("python_tag", "eom"):
        if flag in message:
            if not isinstance(message[flag], bool):
                raise ValueError(f"{where} {flag!r} must be a bool, got {message[flag]!r}")
            if message[flag] and role != "assistant":
                raise ValueError(f"{where}: {flag!r} is only valid on assistant messages, not {role!r}")


class ChatFormat:
    """Renders messages and dialogs as Llama 3 chat prompts. Message content is always encoded as plain text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def check_supported(self) -> None:
        """Raise ValueError unless the tokenizer's vocabulary is Llama 3's, the only chat format rendered yet."""
        if self.tokenizer.eot_id is None:  # a vocabulary with a sidecar (llama.bpe), e.g. SmolLM2's ChatML
            raise ValueError(f"{self.tokenizer.model_path} is not Llama 3's vocabulary; chat formats other than "
                             "Llama 3's (the GGUF's chat template) are not supported yet")

    def _special(self, name: str) -> int:
        return self.tokenizer.special_tokens[name]

    def encode_header(self, message: Message) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>` and a blank line; the `tool` role renders as `ipython`."""
        self.check_supported()
        role = "ipython" if message["role"] == "tool" else message["role"]
        return [
            self._special("<|start_header_id|>"),
            *self.tokenizer.encode(role, bos=False, eos=False),
            self._special("<|end_header_id|>"),
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> list[int]:
        """Header, then the stripped content, then `<|eot_id|>` (or `<|eom_id|>` when `eom`)."""
        validate_message(message)
        return self._encode_message(message)

    def _encode_message(self, message: Message) -> list[int]:
        self.check_supported()
        tokens = self.encode_header(message)
        if message.get("python_tag"):
            tokens.append(self.tokenizer.python_tag_id)
        tokens += self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        tokens.append(self.tokenizer.eom_id if message.get("eom") else self.tokenizer.eot_id)
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """`<|begin_of_text|>`, every message, then an empty assistant header for the model to complete."""
        if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence) or len(dialog) == 0:
            raise ValueError("a dialog must be a non-empty list of messages")
        tokens = [self.tokenizer.bos_id]
        for index, message in enumerate(dialog):
            validate_message(message, index)
            tokens += self._encode_message(message)
        return tokens + self.encode_header({"role": "assistant", "content": ""})
