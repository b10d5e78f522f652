"""The request bodies the server accepts, as pydantic models: OpenAI's fields (others are ignored, not refused),
with OpenAI's ranges, so that a bad value is a 400 naming the field before any work."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # as OpenAI allows


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "ipython"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string: a list of text parts is joined."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None


class _Sampling(_Body):
    """What both completion endpoints share."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: Stop = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # what a torch.Generator takes
    n: Annotated[int, Field(ge=1, le=1)] = 1  # several choices per prompt are not supported
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]  # an empty stop string would end every reply at once

    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] = 16  # OpenAI's default
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
