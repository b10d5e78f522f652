"""The three implementations the generation benchmark runs, behind one interface (`Runner`): this library, HF
transformers and llama.cpp (through llama-cpp-python). Each runner loads its model and offers a prefill, a greedy
`generate`, and a way to observe each model call so that the decode phase can be timed from inside `generate`."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench_measure import model_bytes
from safetensors_writer import ALIGNMENT


def first_call_is_prefill(callback: Callable[[bool], None]) -> Callable[..., None]:
    """A model-call callback for `Runner.on_model_call` where the first call is the prompt's forward and every
    later one a decode step."""
    calls: list[None] = []

    def call(*_: Any) -> None:
        callback(not calls)
        calls.append(None)

    return call


def observe_engine_steps(llama: Any, callback: Callable[[bool], None]) -> Callable[[], None]:
    """Call `callback(prefill)` after each model step that `llama.generate` makes; return what undoes that.

    The one place that depends on how a `Llama` reaches its model: it wraps the engine's step function
    (`llama.engine.forward`). Wrapping that rather than hooking the model matters, because compiled decode steps
    run the model's graph without calling its modules' forward.
    """
    engine = llama.engine
    step = engine.forward

    def step_and_call_back(tokens: torch.Tensor, start_pos: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = step(tokens, start_pos, *args, **kwargs)
        # A prompt's chunks name their slots; a decode step (several tokens a row where a prompt-lookup draft is
        # verified) runs over slots [0, n). Counting widths instead would take a draft for a prompt, and a prompt
        # whose cached prefix leaves one token for a decode step.
        callback("slot" in kwargs)
        return logits

    engine.forward = step_and_call_back
    return lambda: setattr(engine, "forward", step)


class Runner:
    """What a worker needs from one implementation: prefill, greedy generate, and the model to hook."""

    model: torch.nn.Module
    max_batch = 1 << 30  # the largest decode batch it runs
    all_logits = True  # whether it can return every position's logits

    def prefill(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Logits of a forward over `tokens` (1, n) placed at position 0, filling the KV cache."""
        raise NotImplementedError

    def weights_bytes(self) -> int:
        return model_bytes(self.model)

    def misaligned_weights(self) -> int:
        return sum(t.data_ptr() % ALIGNMENT != 0 for t in self.model.parameters())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (new tokens only)."""
        raise NotImplementedError

    def on_model_call(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call `callback(prefill)` each time a model call returns (prefill: whether it was a prompt's forward);
        returns what stops that. Here the first call is the prompt's forward, every later one a decode step."""
        return self.model.register_forward_hook(first_call_is_prefill(callback)).remove


class OursRunner(Runner):
    """This library: `Llama.build` and `Llama.generate`."""

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype) -> None:
        from llama.generation import Llama

        extra = {"quantize": spec["quantize"]} if spec["quantize"] else {}
        if spec.get("compile"):
            extra["compile"] = True
        self.llama = Llama.build(spec["meta_dir"], max_seq_len=spec["max_seq_len"],
                                 max_batch_size=max(spec["batch_sizes"]), device=spec["device"], dtype=dtype, **extra)
        self.model = self.llama.model

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        starts = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return self.model.step(tokens, starts, kv_len=tokens.shape[1], last_logits_only=last_only)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return self.llama.generate(prompts, new_tokens, temperature=0)[0]

    def on_model_call(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        return observe_engine_steps(self.llama, callback)


class TransformersRunner(Runner):
    """HF transformers' `LlamaForCausalLM` with sdpa attention and its default (dynamic) cache."""

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        # device_map loads straight onto the GPU (it needs accelerate); on the CPU the weights stay memory-mapped.
        placement = {"device_map": spec["device"]} if spec["device"] != "cpu" else {}
        self.model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype, attn_implementation="sdpa",
                                                      **placement).eval()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        # logits_to_keep=0 means all positions in transformers.
        return self.model(tokens, use_cache=True, logits_to_keep=1 if last_only else 0).logits

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        input_ids = torch.tensor(prompts, device=self.model.device)
        # eos_token_id=None: never stop early, so exactly new_tokens tokens (and no logits are altered, unlike
        # min_new_tokens, which would mask end-of-sequence tokens and could change the greedy choice).
        output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return output[:, input_ids.shape[1]:].tolist()


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python: a GGUF of the same weights, its own greedy `generate` loop, one
    sequence at a time (its Python API has no batched decoding), last-position logits only."""

    max_batch = 1
    all_logits = False

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype) -> None:
        from llama_cpp import Llama as LlamaCpp

        self.gguf = Path(spec["gguf"])
        self.llm = LlamaCpp(str(self.gguf), n_ctx=spec["max_seq_len"], n_batch=min(spec["max_seq_len"], 512),
                            n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)
        self.model = None

    def prefill(self, tokens: torch.Tensor, last_only: bool) -> None:
        self.llm.reset()
        self.llm.eval(tokens[0].tolist())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        rows = []
        for prompt in prompts:
            tokens = []
            self.llm.reset()  # no reuse of the previous run's prompt: every run prefills its prompt in full
            for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            rows.append(tokens)
        return rows

    def on_model_call(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        # Rows run one after another, each with its own prompt's eval; only the first counts as the prefill.
        evaluate, called_back = self.llm.eval, first_call_is_prefill(callback)

        def evaluate_and_call_back(tokens: Any) -> None:
            evaluate(tokens)
            called_back()

        self.llm.eval = evaluate_and_call_back
        return lambda: delattr(self.llm, "eval")

    def weights_bytes(self) -> int:
        return self.gguf.stat().st_size

    def misaligned_weights(self) -> int:
        return 0


# Each implementation's runner, and the module to import before the load clock starts (load time is that of
# building the model, not of imports).
RUNNERS: dict[str, tuple[str, type[Runner]]] = {
    "ours": ("llama.generation", OursRunner),
    "transformers": ("transformers.models.llama", TransformersRunner),
    "llama.cpp": ("llama_cpp", LlamaCppRunner),
}
