"""Chat formats: messages rendered as prompt tokens, in Llama 3's format (with Llama 3.1 tool use) or, for another
vocabulary imported from GGUF, with the chat template it came with."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

from llama.chat_template import ChatTemplate

if TYPE_CHECKING:  # for the annotations only: llama.tokenizer imports this module, for Meta's import path
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
    """Renders dialogs as chat prompts: Llama 3's format for Llama 3's vocabulary; for a vocabulary with a sidecar
    (llama.bpe), the chat template in it (e.g. SmolLM2's ChatML). Message content is always encoded as plain text."""

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self._template: ChatTemplate | None = None

    @property
    def is_llama3(self) -> bool:
        return self.tokenizer.info is None

    def check_supported(self) -> None:
        """Raise ValueError unless dialogs can be rendered: Llama 3's vocabulary, or a valid chat template."""
        self.template()

    def template(self) -> ChatTemplate | None:
        """The sidecar vocabulary's chat template (None for Llama 3's format), compiled on first use."""
        if self.is_llama3 or self._template is not None:
            return self._template
        info, path = self.tokenizer.info, self.tokenizer.model_path
        if not info.get("chat_template"):
            raise ValueError(f"{path} is not Llama 3's vocabulary and its sidecar has no chat template, so it has no "
                             "chat format; use text completion")
        name = lambda token: self.tokenizer.decode([token])  # noqa: E731  (a special token's id as its text)
        self._template = ChatTemplate(info["chat_template"], name(self.tokenizer.bos_id),
                                      name(self.tokenizer.eos_id), name=f"the chat template of {path}")
        return self._template

    def _special(self, name: str) -> int:
        return self.tokenizer.special_tokens[name]

    def _check_llama3(self, what: str) -> None:
        if not self.is_llama3:
            raise ValueError(f"{what} is Llama 3's chat format only; {self.tokenizer.model_path} renders dialogs with "
                             "its chat template (encode_dialog_prompt)")

    def encode_header(self, message: Message) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>` and a blank line; the `tool` role renders as `ipython`."""
        self._check_llama3("encode_header")
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
        self._check_llama3("encode_message")
        tokens = self.encode_header(message)
        if message.get("python_tag"):
            tokens.append(self.tokenizer.python_tag_id)
        tokens += self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        tokens.append(self.tokenizer.eom_id if message.get("eom") else self.tokenizer.eot_id)
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """The prompt for the assistant's next reply. Llama 3: `<|begin_of_text|>`, every message, then an empty
        assistant header. Otherwise: the chat template's rendering with its generation prompt."""
        if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence) or len(dialog) == 0:
            raise ValueError("a dialog must be a non-empty list of messages")
        for index, message in enumerate(dialog):
            validate_message(message, index)
        template = self.template()
        if template is not None:
            return self._encode_with_template(template, dialog)
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens += self._encode_message(message)
        return tokens + self.encode_header({"role": "assistant", "content": ""})

    def _encode_with_template(self, template: ChatTemplate, dialog: Dialog) -> list[int]:
        for index, message in enumerate(dialog):
            flags = sorted(flag for flag in ("python_tag", "eom") if message.get(flag))
            if flags:
                raise ValueError(f"message {index}: {flags} are Llama 3.1 tool-use flags; "
                                 f"{self.tokenizer.model_path}'s chat template has no such marks")
        # The special tokens of the template's own text split the prompt; what lies between them, content and
        # template text alike, is encoded as one text, as Hugging Face's apply_chat_template does.
        tokens: list[int] = []
        text = ""
        for segment, is_content in template.segments([{"role": m["role"], "content": m["content"]} for m in dialog]):
            for piece in [segment] if is_content else self.tokenizer.split_special(segment):
                if isinstance(piece, str):
                    text += piece
                    continue
                tokens += self.tokenizer.encode(text, bos=False, eos=False) + [piece]
                text = ""
        return tokens + self.tokenizer.encode(text, bos=False, eos=False)
