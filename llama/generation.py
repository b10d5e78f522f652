"""`Llama`: build a model from a Meta checkpoint, then generate text, completions and chat replies."""

import functools
import os
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

from llama.args import ModelArgs
from llama.arguments import check_build_values, check_max_gen_len, check_sampling, token_ids
from llama.chat_format import ChatFormat, Dialog, Message
from llama.checkpoint.load import load_model, read_params
from llama.compile import CompiledDecoding
from llama.engine import Engine
from llama.kernels import linear_kernel
from llama.model import Transformer
from llama.parallel import setup_model_parallel
from llama.sampling import sample_top_p
from llama.text_stream import TextStream
from llama.tokenizer import Tokenizer

PAD_ID = -1  # marks not-yet-generated positions; never fed to the model


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


class StopCheck:
    """Answers "has every row stopped?" once per decode step, without stalling a GPU.

    Waiting on a GPU for the current step's answer would leave it idle while the host prepares the next step, so
    there the answer given is the previous step's, copied to the host in the background: at worst one extra step
    runs, whose tokens come after every row's stop token and are cut off.
    """

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        self.pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def __call__(self, stopped: torch.Tensor) -> bool:
        if not self.lagged:
            return bool(stopped.all())
        previous = self.pending
        self.pending = (stopped.all().to("cpu", non_blocking=True), torch.cuda.Event())
        self.pending[1].record()
        if previous is None:
            return False
        previous[1].synchronize()
        return bool(previous[0])


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
    ) -> "Llama":
        """Load a Meta checkpoint folder (`consolidated.NN.pth`, `params.json`, `tokenizer.model`).

        Works under torchrun (one process per checkpoint shard, on one or several nodes) and in a plain Python
        process or notebook. `device` defaults to CUDA, else MPS, else CPU; `dtype` to bfloat16 where supported.
        `quantize="int8"` stores the linear layers' weights as int8 with per-output-channel scales (about half
        the memory and, on CPU, faster decoding, at a small cost in accuracy). `compile=True` decodes through
        `torch.compile` (CUDA graphs on GPUs; see `llama.compile`): faster steps after a slow first
        one per batch size.
        """
        device, dtype = check_build_values(max_seq_len, max_batch_size, model_parallel_size, seed, device, dtype,
                                           quantize, compile)
        ckpt_dir = Path(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path if tokenizer_path is not None else ckpt_dir / "tokenizer.model")
        setup_model_parallel(device, model_parallel_size)

        args = ModelArgs.from_params(read_params(ckpt_dir), max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"{ckpt_dir / 'params.json'} has vocab_size {args.vocab_size} but the tokenizer "
                f"{tokenizer.model_path} has {tokenizer.n_words} tokens; they must belong to the same model"
            )
        started = time.perf_counter()
        model = load_model(
            ckpt_dir,
            args,
            get_model_parallel_rank(),
            get_model_parallel_world_size(),
            device=device,
            dtype=dtype,
            show_progress=dist.get_rank() == 0,
            # Compiling on the CPU freezes plain weights into inductor's own layout, so oneDNN's packing would be lost.
            make_linear=functools.partial(linear_kernel, quantize=quantize, pack=not compile),
        )
        if dist.get_rank() == 0:
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            print(f"Loaded {ckpt_dir} in {time.perf_counter() - started:.2f} s "
                  f"({size / 1e9:.2f} GB of weights in each of {get_model_parallel_world_size()} processes)", flush=True)
        return Llama(model, tokenizer, seed=seed, compile=compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.device = model.norm.weight.device
        # `forward(tokens, start_pos, last_logits_only=...)`: the logits, decode steps through torch.compile if asked.
        self.forward = CompiledDecoding(model) if compile else model
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.engine = Engine(self.forward, model, tokenizer, self.generator)
        self._open_stream: weakref.ref[TextStream] | None = None  # the last stream, until it is read to the end
        self._stop_tokens = torch.tensor(sorted(tokenizer.stop_tokens), device=self.device)

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
    ) -> list[ChatPrediction]:
        """Reply to each dialog as the assistant.

        The reply is a Message; a tool call the model makes carries `python_tag` and/or `eom`, so the reply can be
        appended to the dialog as it is, followed by the tool's result as an `ipython` message.
        """
        dialogs = _as_list(dialogs, "dialogs", "dialogs (each a list of messages)")
        prompt_tokens = []
        for index, dialog in enumerate(dialogs):
            try:
                prompt_tokens.append(self.formatter.encode_dialog_prompt(dialog))
            except ValueError as error:
                raise ValueError(f"dialog {index}: {error}") from None
        sequences = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo=False)
        return [self._prediction(s, self._assistant_message(s), logprobs) for s in sequences]

    def stream_completion(
        self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None
    ) -> TextStream:
        """Complete one text prompt, yielding text as it is generated.

        The pieces join into what `text_completion([prompt], ...)` returns for the same seed and arguments.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        prompt_tokens = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        return self._stream(prompt_tokens, max_gen_len, temperature, top_p, chat=False)

    def stream_chat(
        self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int | None = None
    ) -> TextStream:
        """Reply to one dialog as the assistant, yielding text as it is generated.

        The pieces join into the reply's `content` from `chat_completion([dialog], ...)` for the same seed and
        arguments. A tool call shows as `stream.tokens` starting with python_tag or `stream.stop_token == eom_id`.
        """
        return self._stream(self.formatter.encode_dialog_prompt(dialog), max_gen_len, temperature, top_p, chat=True)

    def _stream(
        self, prompt_tokens: list[int], max_gen_len: int | None, temperature: float, top_p: float, chat: bool
    ) -> TextStream:
        # Check now, not on the first next(): a generator body only runs when iterated.
        [prompt_tokens], max_gen_len = self._check_generate_args([prompt_tokens], max_gen_len, temperature, top_p)
        stream = TextStream(self.tokenizer, prompt_tokens, self._stream_tokens(prompt_tokens, max_gen_len,
                                                                               temperature, top_p), chat)
        self._open_stream = weakref.ref(stream)  # a stream nobody holds any more can no longer be read
        return stream

    @torch.inference_mode()
    def _stream_tokens(self, prompt: list[int], max_gen_len: int, temperature: float, top_p: float) -> Iterator[int]:
        """Yield the tokens `_generate_batch` gives for a batch of just `prompt`, each as soon as it is picked.

        The same forward calls and `_sample` draws in the same order, so a seed gives the same tokens; the last
        token yielded is the stop token, if one came. Nothing else may use the model until this is exhausted:
        the KV cache is shared.
        """
        total_len = min(self.model.args.max_seq_len, max_gen_len + len(prompt))
        tokens = torch.full((1, total_len), PAD_ID, dtype=torch.long, device=self.device)
        tokens[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        prev_pos = 0
        for cur_pos in range(len(prompt), total_len):
            logits = self.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_logits_only=True)
            tokens[:, cur_pos] = self._sample(logits[:, -1], temperature, top_p)
            prev_pos = cur_pos
            token = int(tokens[0, cur_pos])
            yield token
            if token in self.tokenizer.stop_tokens:
                return

    def _assistant_message(self, sequence: GeneratedSequence) -> Message:
        tokens = sequence.tokens
        message: Message = {"role": "assistant", "content": ""}
        if self.tokenizer.python_tag_id is not None and tokens[:1] == [self.tokenizer.python_tag_id]:
            tokens = tokens[1:]
            message["python_tag"] = True
        if self.tokenizer.eom_id is not None and sequence.stop_token == self.tokenizer.eom_id:
            message["eom"] = True
        message["content"] = self.tokenizer.decode(tokens)
        return message

    def _prediction(self, sequence: GeneratedSequence, generation, logprobs: bool) -> dict:
        if not logprobs:
            return {"generation": generation}
        pieces = [self.tokenizer.decode([t]) for t in sequence.tokens]
        return {"generation": generation, "tokens": pieces, "logprobs": sequence.logprobs}

    def _check_generate_args(
        self, prompt_tokens: Any, max_gen_len: int | None, temperature: float, top_p: float
    ) -> tuple[list[list[int]], int]:
        """The prompts as lists of ints and max_gen_len as an int, all checked; refused while a stream is open."""
        stream = self._open_stream() if self._open_stream is not None else None
        if stream is not None and not stream.finished:
            raise RuntimeError("a stream from stream_completion/stream_chat is still being read; read it to the end "
                               "or call its close() before generating again (streams share the model's KV cache)")
        args = self.model.args
        max_gen_len = check_max_gen_len(max_gen_len, args.max_seq_len)
        check_sampling(temperature, top_p)
        prompts = [token_ids(prompt, index, args.vocab_size) for index, prompt in enumerate(prompt_tokens)]
        for index, prompt in enumerate(prompts):
            if len(prompt) > args.max_seq_len:
                raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than max_seq_len={args.max_seq_len}")
        return prompts, max_gen_len

    @torch.inference_mode()
    def _generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int | None,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
    ) -> list[GeneratedSequence]:
        prompt_tokens, max_gen_len = self._check_generate_args(
            _as_list(prompt_tokens, "prompt_tokens", "lists of token ids"), max_gen_len, temperature, top_p)
        batch = self.model.args.max_batch_size
        results: list[GeneratedSequence] = []
        for start in range(0, len(prompt_tokens), batch):
            chunk = prompt_tokens[start : start + batch]
            results += self._generate_batch(chunk, max_gen_len, temperature, top_p, logprobs, echo)
        return results

    def _generate_batch(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
    ) -> list[GeneratedSequence]:
        bsz = len(prompt_tokens)
        prompt_lens = [len(p) for p in prompt_tokens]
        total_len = min(self.model.args.max_seq_len, max_gen_len + max(prompt_lens))

        tokens = torch.full((bsz, total_len), PAD_ID, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        is_prompt = tokens != PAD_ID  # (bsz, total_len)
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float32, device=self.device) if logprobs else None
        stopped = torch.zeros(bsz, dtype=torch.bool, device=self.device)

        # Every row advances one position per step; a row still inside its (longer) prompt keeps its own token.
        prev_pos = 0
        all_stopped = StopCheck(self.device)
        for cur_pos in range(min(prompt_lens), total_len):
            logits = self.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_logits_only=not logprobs)
            next_token = self._sample(logits[:, -1], temperature, top_p)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                targets = tokens[:, prev_pos + 1 : cur_pos + 1]  # (bsz, cur_pos - prev_pos)
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), targets, reduction="none", ignore_index=PAD_ID
                )
            stopped |= ~is_prompt[:, cur_pos] & torch.isin(next_token, self._stop_tokens)
            prev_pos = cur_pos
            if all_stopped(stopped):
                break
        if logprobs and min(prompt_lens) == total_len:  # nothing generated: score the prompts alone
            logits = self.model(tokens, 0)
            token_logprobs[:, 1:] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=PAD_ID
            )

        results = []
        for row, prompt_len in enumerate(prompt_lens):
            end = min(prompt_len + max_gen_len, total_len)
            generated = tokens[row, prompt_len:end].tolist()
            stop_token = next((t for t in generated if t in self.tokenizer.stop_tokens), None)
            if stop_token is not None:
                end = prompt_len + generated.index(stop_token)
            begin = 0 if echo else prompt_len
            row_tokens = tokens[row, begin:end].tolist()
            row_logprobs = token_logprobs[row, begin:end].tolist() if logprobs else None
            results.append(GeneratedSequence(row_tokens, row_logprobs, stop_token))
        return results

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """Pick the next token of each row (logits: (bsz, vocab)); identical on every rank."""
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = sample_top_p(probs, top_p, self.generator).reshape(-1)
        else:
            next_token = torch.argmax(logits, dim=-1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Ranks hold bit-identical logits, but a single diverging pick would desynchronise them for good.
            dist.broadcast(next_token, src=0)
        return next_token


def _as_list(values: Any, name: str, of: str) -> list:
    """`values` as a list: any iterable (a generator too), but not a lone str or dict."""
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of {of}, got {type(values).__name__}")
    return list(values)
