"""`Llama`: build a model from a Meta checkpoint, then generate text, completions and chat replies."""

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from llama.args import ModelArgs
from llama.chat_format import ChatFormat, Dialog, Message
from llama.checkpoint.load import load_model, read_params
from llama.compile import CompiledDecoding
from llama.devices import keep_freed_cpu_memory
from llama.engine import Engine, Request, SamplingParams, check_prompt
from llama.grammar import answer_grammar, response_schema
from llama.cpu_decode import use_cpu_kernels
from llama.kernels import linear_kernel, weight_bytes
from llama.model import Transformer
from llama.parallel import setup_model_parallel
from llama.prompt_lookup import DEFAULT_K
from llama.sampling import check_sampling, sample_top_p  # noqa: F401  (Meta's llama.generation.sample_top_p)
from llama.text_stream import TextStream, TokenDecoder
from llama.tokenizer import Tokenizer
from llama.tool_calls import parse_tool_calls
from llama.tool_prompt import check_tool_format, check_tools, default_tool_format
from llama.validation import check_build_values, check_max_gen_len, check_quantize_shapes


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # with logprobs=True
    logprobs: list[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # with logprobs=True
    logprobs: list[float]  # with logprobs=True


@dataclass
class GeneratedSequence:
    """One generated sequence: its tokens (stop token excluded), their logprobs, and the stop token if any."""

    tokens: list[int]
    logprobs: list[float] | None
    stop_token: int | None


class Llama:
    """A Llama 3.x model with its tokenizer, ready to generate."""

    @staticmethod
    def build(
        ckpt_dir: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: int | None = None,
        seed: int = 1,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantize: str | None = None,
        compile: bool = False,
        prompt_lookup: int | None = None,
        prefix_reuse: bool = True,
    ) -> "Llama":
        """Load a Meta checkpoint folder (`consolidated.NN.pth`, `params.json`, `tokenizer.model`).

        Works under torchrun (one process per checkpoint shard, on one or several nodes) and in a plain Python
        process or notebook. `device` defaults to CUDA, else MPS, else CPU; `dtype` to bfloat16 where supported.
        `quantize="int8"` stores the linear layers' weights as int8 with per-output-channel scales (about half
        the memory at a small cost in accuracy; on x86 CPUs with AVX-512 VNNI the activations are quantized too,
        per 32 values, so that only the int8 weights are read; see `llama.int8_cpu`); `"int4"` in 4 bits with a
        float16 scale and minimum per 32 input values (`llama.int4`: on such CPUs with `llama.blocks_cpu`'s
        kernel, which quantizes activations the same way; elsewhere torch's int4 kernels). `compile=True` decodes
        through `torch.compile` (CUDA graphs on GPUs, much faster steps there after a slow first one per batch
        size; see `llama.compile`). `prompt_lookup=K` drafts up to K tokens per sequence and decode step from its
        own prompt and output, verified in the same step (`llama.prompt_lookup`; 0: off; None: 8 for eager decoding on
        the CPU, where it was measured to pay, else 0). `prefix_reuse=False`
        computes every prompt in full instead of reusing the keys and values a finished sequence left in its slot
        (`llama.prefix_cache`; the same tokens either way). README's benchmark section has the figures.
        """
        device, dtype = check_build_values(max_seq_len, max_batch_size, model_parallel_size, seed, device, dtype,
                                           quantize, compile, prompt_lookup, prefix_reuse)
        ckpt_dir = Path(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path if tokenizer_path is not None else ckpt_dir / "tokenizer.model")
        setup_model_parallel(device, model_parallel_size)

        args = ModelArgs.from_params(read_params(ckpt_dir), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(f"{ckpt_dir / 'params.json'} has vocab_size {args.vocab_size} but the tokenizer "
                             f"{tokenizer.model_path} has {tokenizer.n_words} tokens; "
                             "they must belong to the same model")
        check_quantize_shapes(quantize, args, get_model_parallel_world_size())
        started = time.perf_counter()
        model = load_model(
            ckpt_dir, args, get_model_parallel_rank(), get_model_parallel_world_size(),
            device=device,
            dtype=dtype,
            show_progress=dist.get_rank() == 0,
            make_linear=functools.partial(linear_kernel, quantize=quantize),
        )
        if device.type == "cpu":
            keep_freed_cpu_memory()  # after loading, so that the weights are placed as glibc would anyway
        if dist.get_rank() == 0:
            size = weight_bytes(model)
            print(f"Loaded {ckpt_dir} in {time.perf_counter() - started:.2f} s "
                  f"({size / 1e9:.2f} GB of weights in each of {get_model_parallel_world_size()} processes)", flush=True)
        return Llama(model, tokenizer, seed=seed, compile=compile, prompt_lookup=prompt_lookup,
                     prefix_reuse=prefix_reuse)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, compile: bool = False,
                 prompt_lookup: int | None = None, prefix_reuse: bool = True):
        """Generate with `model` (its weights in place) and `tokenizer`; sets up the model's KV caches."""
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.device = model.norm.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        model.setup_caches()
        use_cpu_kernels(model)
        if prompt_lookup is None:  # on by default only where it was measured to pay (README's benchmark)
            prompt_lookup = DEFAULT_K if self.device.type == "cpu" and not compile else 0
        self.engine = Engine(model, tokenizer, self.generator, forward=CompiledDecoding(model) if compile else None,
                             prompt_lookup=prompt_lookup, prefix_reuse=prefix_reuse)

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt by up to `max_gen_len` tokens; greedy when temperature is 0.

        Each sequence ends before its first stop token (end_of_text, eom_id or eot_id; `tokenizer.stop_tokens`).
        Returns the generated tokens (with the prompt first when `echo`) and, with `logprobs`, the log-probability
        of each of them.
        """
        sequences = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        tokens = [s.tokens for s in sequences]
        return tokens, ([s.logprobs for s in sequences] if logprobs else None)

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each text prompt. `max_gen_len=None` generates up to the model's max_seq_len."""
        prompts = _as_list(prompts, "prompts", "str")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of str")
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        sequences = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return [self._prediction(s, self.tokenizer.decode(s.tokens), logprobs) for s in sequences]

    def chat_completion(
        self,
        dialogs: Sequence[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        tools: list[dict] | None = None,
        tool_format: str | None = None,
        date_string: str | None = None,
        response_format: dict | None = None,
    ) -> list[ChatPrediction]:
        """Reply to each dialog as the assistant.

        The reply is a Message; a tool call the model makes carries `python_tag` and/or `eom`, so the reply can be
        appended to the dialog as it is, followed by the tool's result as an `ipython` (`tool`) message. With
        `tools` (OpenAI function tools, see llama.tool_prompt), the prompt offers them in Meta's format
        `tool_format` (default: "pythonic" for Llama 3.2 1B/3B shapes, else "json"), `date_string` being its
        `Today Date:` (default: today), and a reply that calls tools holds them in `tool_calls`, its content empty.
        `response_format` (OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
        ...}}) constrains the reply to compact JSON of that schema, or with tools to it or a call (llama.grammar).
        """
        dialogs = _as_list(dialogs, "dialogs", "dialogs (each a list of messages)")
        tools, tool_format, grammar = self._chat_options(tools, tool_format, response_format)
        prompt_tokens = []
        for index, dialog in enumerate(dialogs):
            try:
                prompt_tokens.append(self.formatter.encode_dialog_prompt(dialog, tools, tool_format, date_string))
            except ValueError as error:
                raise ValueError(f"dialog {index}: {error}") from None
        sequences = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo=False,
                                   grammar=grammar)
        return [self._prediction(s, self._assistant_message(s, bool(tools)), logprobs) for s in sequences]

    def stream_completion(
        self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None
    ) -> TextStream:
        """Complete one text prompt, yielding text as it is generated.

        The pieces join into what `text_completion([prompt], ...)` returns for the same seed and arguments.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        prompt_tokens = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        return self._stream(prompt_tokens, max_gen_len, temperature, top_p)

    def stream_chat(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        tools: list[dict] | None = None,
        tool_format: str | None = None,
        date_string: str | None = None,
        response_format: dict | None = None,
    ) -> TextStream:
        """Reply to one dialog as the assistant, yielding text as it is generated.

        The pieces join into the reply's `content` from `chat_completion([dialog], ...)` for the same seed and
        arguments (a tool call's text included). A tool call shows as `stream.tokens` starting with python_tag or
        `stream.stop_token == eom_id`; once the stream has ended, `stream.message` is chat_completion's reply and,
        with `tools`, `stream.tool_calls` the calls it makes. `response_format` as in chat_completion.
        """
        tools, tool_format, grammar = self._chat_options(tools, tool_format, response_format)
        prompt = self.formatter.encode_dialog_prompt(dialog, tools, tool_format, date_string)

        def reply(tokens: list[int], stop_token: int | None) -> Message:
            return self._assistant_message(GeneratedSequence(tokens, None, stop_token), bool(tools))

        return self._stream(prompt, max_gen_len, temperature, top_p, grammar=grammar, reply=reply)

    def _stream(
        self, prompt_tokens: list[int], max_gen_len: int | None, temperature: float, top_p: float,
        grammar: str | None = None, reply: Callable[[list[int], int | None], Message] | None = None,
    ) -> TextStream:
        """A stream of the prompt's continuation; with `reply` (how its tokens make a chat reply), a chat stream."""
        # Submitted now, not on the first next(): the arguments are checked at the call, and the sequence's seed is
        # drawn in call order.
        [prompt_tokens], max_gen_len = self._check_generate_args([prompt_tokens], max_gen_len, temperature, top_p)
        sequence = self._submit(prompt_tokens, max_gen_len, temperature, top_p, grammar=grammar)
        return TextStream(self.tokenizer, prompt_tokens, self._tokens_of(sequence),
                          release=functools.partial(self.engine.cancel, sequence), reply=reply)

    def _tokens_of(self, sequence: Request) -> Iterator[int]:
        """`sequence`'s tokens as they come, then the stop token that ended it, if one did; steps the engine (every
        sequence in it advances) while there is no new token."""
        given = 0
        while True:
            while given < len(sequence.tokens):  # more may come while one is yielded: others step the engine too
                yield sequence.tokens[given]
                given += 1
            if sequence.finished:
                break
            self.engine.step()
        if sequence.stop_token is not None:
            yield sequence.stop_token

    def _submit(self, prompt: list[int], max_gen_len: int, temperature: float, top_p: float, logprobs: bool = False,
                echo: bool = False, grammar: str | None = None) -> Request:
        max_tokens = min(max_gen_len, self.model.args.max_seq_len - len(prompt))
        params = SamplingParams(max_tokens, temperature, top_p, logprobs=logprobs, echo_logprobs=logprobs and echo,
                                grammar=grammar)
        return self.engine.submit(prompt, params)

    def _assistant_message(self, sequence: GeneratedSequence, with_tools: bool = False) -> Message:
        decoder = TokenDecoder(self.tokenizer, chat=True)
        content = "".join(map(decoder.decode, sequence.tokens)) + decoder.finish()
        message: Message = {"role": "assistant", "content": content}
        if decoder.python_tag:
            message["python_tag"] = True
        if self.tokenizer.eom_id is not None and sequence.stop_token == self.tokenizer.eom_id:
            message["eom"] = True
        calls = parse_tool_calls(content, decoder.python_tag) if with_tools else []
        if calls:  # as llama-models' decoder does: the calls replace the text they were written in
            message.update(content="", tool_calls=calls)
        return message

    def _chat_options(self, tools: Any, tool_format: str | None,
                      response_format: Any) -> tuple[list[dict], str, str | None]:
        """The tools, checked; the tool format: as given, or the one this model's shape was trained on; and the
        grammar of the response format, if one is asked for."""
        tools = check_tools(tools)
        if tool_format is None:
            tool_format = default_tool_format(self.model.args.dim, self.model.args.n_layers)
        schema = response_schema(response_format)
        grammar = None if schema is None else answer_grammar(schema, tools, self.tokenizer.python_tag_id is not None,
                                                             "response_format's schema")
        return tools, check_tool_format(tool_format), grammar

    def _prediction(self, sequence: GeneratedSequence, generation, logprobs: bool) -> dict:
        if not logprobs:
            return {"generation": generation}
        pieces = [self.tokenizer.decode([t]) for t in sequence.tokens]
        return {"generation": generation, "tokens": pieces, "logprobs": sequence.logprobs}

    def _check_generate_args(
        self, prompt_tokens: Any, max_gen_len: int | None, temperature: float, top_p: float
    ) -> tuple[list[list[int]], int]:
        """The prompts as lists of ints and max_gen_len as an int, all checked."""
        args = self.model.args
        max_gen_len = check_max_gen_len(max_gen_len, args.max_seq_len)
        check_sampling(temperature, top_p)
        # max_tokens 0: a prompt may fill the context, generating nothing, as in Meta's reference
        prompts = [check_prompt(prompt, 0, args, f"prompt {index}") for index, prompt in enumerate(prompt_tokens)]
        return prompts, max_gen_len

    def _generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        grammar: str | None = None,
    ) -> list[GeneratedSequence]:
        """Submit every prompt (the engine queues those beyond its slots) and step until all have finished."""
        prompt_tokens, max_gen_len = self._check_generate_args(
            _as_list(prompt_tokens, "prompt_tokens", "lists of token ids"), max_gen_len, temperature, top_p)
        sequences = [self._submit(p, max_gen_len, temperature, top_p, logprobs, echo, grammar) for p in prompt_tokens]
        try:
            while not all(s.finished for s in sequences):
                self.engine.step()
        finally:
            for sequence in sequences:  # an interrupted call leaves nothing running
                self.engine.cancel(sequence)
        return [_result(s, logprobs, echo) for s in sequences]


def _result(sequence: Request, logprobs: bool, echo: bool) -> GeneratedSequence:
    """`sequence` as `generate` returns it: with echo, the prompt first (its first token's logprob is 0)."""
    tokens, token_logprobs = sequence.tokens, sequence.logprobs if logprobs else None
    if echo:
        tokens = sequence.prompt_tokens + tokens
        if logprobs:
            token_logprobs = [0.0] + sequence.prompt_logprobs[1:] + sequence.logprobs
    return GeneratedSequence(tokens, token_logprobs, sequence.stop_token)


def _as_list(values: Any, name: str, of: str) -> list:
    """`values` as a list: any iterable (a generator too), but not a lone str or dict."""
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of {of}, got {type(values).__name__}")
    return list(values)
