"""Chat formats: messages rendered as prompt tokens, in Llama 3's format (with tools, as Meta's Llama 3.1 template
or Llama 3.2's pythonic prompt renders them) or, for another vocabulary imported from GGUF, with the chat template
it came with."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

from llama.chat_template import ChatTemplate
from llama.tool_calls import ToolCall, check_keys, check_tool_calls
from llama.tool_prompt import check_tool_format, check_tools, render_call, render_dialog, today

if TYPE_CHECKING:  # for the annotations only: llama.tokenizer imports this module, for Meta's import path
    from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython", "tool"]
ROLES = ("system", "user", "assistant", "ipython", "tool")


class Message(TypedDict, total=False):
    """One chat message. `role` and `content` are required; the rest serve tool use.

    - `tool_calls` (assistant only): the tools it calls, `[{"id", "name", "arguments": dict}]`; such a message is
      rendered from its calls (as Meta's template does, its content is not).
    - `tool_call_id` (`tool`/`ipython` only): the call whose result this message holds.
    - `python_tag` (assistant only): the content is a tool call; it is preceded by `<|python_tag|>`.
    - `eom` (assistant only): end with `<|eom_id|>` instead of `<|eot_id|>`: the assistant awaits a tool result,
      which comes back as an `ipython` (alias `tool`) message.
    """

    role: Role
    content: str
    python_tag: bool
    eom: bool
    tool_calls: list[ToolCall]
    tool_call_id: str


Dialog = Sequence[Message]

_MESSAGE_KEYS = {"role", "content", "python_tag", "eom", "tool_calls", "tool_call_id"}


def validate_message(message: Message, index: int = 0) -> None:
    """Raise ValueError naming `index` when `message` is not a well-formed Message."""
    where = f"message {index}"
    check_keys(message, _MESSAGE_KEYS, where, "'role' and 'content'")
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
    if "tool_calls" in message:
        if role != "assistant":
            raise ValueError(f"{where}: 'tool_calls' is only valid on assistant messages, not {role!r}")
        check_tool_calls(message["tool_calls"], where)
    if "tool_call_id" in message:
        if role not in ("tool", "ipython"):
            raise ValueError(f"{where}: 'tool_call_id' is only valid on tool (ipython) messages, not {role!r}")
        if not isinstance(message["tool_call_id"], str):
            raise ValueError(f"{where} 'tool_call_id' must be a str, got {message['tool_call_id']!r}")


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
        """Header, then the stripped content, then `<|eot_id|>` (or `<|eom_id|>` when `eom`). A message with
        `tool_calls` holds its call instead, as Meta's template writes it without tools: JSON, then `<|eot_id|>`."""
        validate_message(message)
        return self._encode_message(message)

    def _encode_message(self, message: Message, tool_format: str = "json") -> list[int]:
        self._check_llama3("encode_message")
        tokens = self.encode_header(message)
        if message.get("tool_calls"):
            python_tag, text, eom = render_call(message["tool_calls"], tool_format, builtin=())
        else:
            python_tag, text, eom = message.get("python_tag"), message["content"].strip(), message.get("eom")
        if python_tag:
            tokens.append(self.tokenizer.python_tag_id)
        tokens += self.tokenizer.encode(text, bos=False, eos=False)
        tokens.append(self.tokenizer.eom_id if eom else self.tokenizer.eot_id)
        return tokens

    def encode_dialog_prompt(self, dialog: Dialog, tools: list[dict] | None = None, tool_format: str | None = None,
                             date_string: str | None = None) -> list[int]:
        """The prompt for the assistant's next reply. Llama 3: `<|begin_of_text|>`, every message, then an empty
        assistant header; with `tools`, the dialog as Meta's format `tool_format` ("json", the default, or
        "pythonic"; see llama.tool_prompt) renders it, `date_string` (default: today, "07 Dec 2026") as its
        `Today Date:`. Otherwise: the chat template's rendering with its generation prompt (and the tools, where
        the template takes them)."""
        if isinstance(dialog, (str, dict)) or not isinstance(dialog, Sequence) or len(dialog) == 0:
            raise ValueError("a dialog must be a non-empty list of messages")
        for index, message in enumerate(dialog):
            validate_message(message, index)
        tools = check_tools(tools)
        tool_format = check_tool_format("json" if tool_format is None else tool_format)
        if date_string is not None and not isinstance(date_string, str):
            raise ValueError(f"date_string must be a str such as '07 Dec 2026', got {date_string!r}")
        template = self.template()
        if template is not None:
            return self._encode_with_template(template, dialog, tools, date_string)
        if tools:
            return self._encode_segments(render_dialog(dialog, tools, tool_format, date_string or today()))
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens += self._encode_message(message, tool_format)
        return tokens + self.encode_header({"role": "assistant", "content": ""})

    def check_takes_tools(self) -> None:
        """Raise ValueError unless dialogs can be rendered with tools: Llama 3's format, or a chat template that
        reads a `tools` variable."""
        template = self.template()
        if template is not None and not template.takes("tools"):
            raise ValueError(f"{template.name} does not take tools (it never reads a `tools` variable), so this "
                             "model cannot be given tools")

    def _encode_with_template(self, template: ChatTemplate, dialog: Dialog, tools: list[dict],
                              date_string: str | None) -> list[int]:
        for index, message in enumerate(dialog):
            flags = sorted(flag for flag in ("python_tag", "eom") if message.get(flag))
            if flags:
                raise ValueError(f"message {index}: {flags} are Llama 3.1 tool-use flags; "
                                 f"{self.tokenizer.model_path}'s chat template has no such marks")
        variables = {"date_string": date_string} if date_string is not None else {}
        if tools:
            self.check_takes_tools()
            variables["tools"] = tools
        return self._encode_segments(template.segments([_template_message(m) for m in dialog], **variables))

    def _encode_segments(self, segments: list[tuple[str, bool]]) -> list[int]:
        """Token ids of (text, is_content) segments: the special tokens of the format's own text split the prompt;
        what lies between them, content and format text alike, is encoded as one text, as Hugging Face's
        apply_chat_template does. Content is always plain text."""
        tokens: list[int] = []
        text = ""
        for segment, is_content in segments:
            for piece in [segment] if is_content else self.tokenizer.split_special(segment):
                if isinstance(piece, str):
                    text += piece
                    continue
                tokens += self.tokenizer.encode(text, bos=False, eos=False) + [piece]
                text = ""
        return tokens + self.tokenizer.encode(text, bos=False, eos=False)


def _template_message(message: Message) -> dict:
    """A message as Hugging Face chat templates read it: OpenAI's shape of tool calls and results."""
    shaped = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        shaped["tool_calls"] = [{"id": call.get("id", f"call_{index}"), "type": "function",
                                 "function": {"name": call["name"], "arguments": call["arguments"]}}
                                for index, call in enumerate(message["tool_calls"])]
    if "tool_call_id" in message:
        shaped["tool_call_id"] = message["tool_call_id"]
    return shaped
