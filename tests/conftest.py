"""Shared fixtures: the real Llama 3 tokenizer (from the `llama-models` package), tiny random checkpoints, and
an independent HF transformers model holding the same weights."""

from pathlib import Path

import pytest
import torch

from llama.tokenizer import ChatFormat, Tokenizer


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), f"llama-models does not ship {path}"
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def chat_format(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="session")
def meta_tokenizer(tokenizer_path):
    """Meta's own tokenizer from `llama-models`: an independent implementation over the same file."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def model_parallel() -> None:
    """A one-process gloo group with fairscale model parallelism of size 1 (what Transformer needs)."""
    from llama.generation import setup_model_parallel

    setup_model_parallel(torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(K)`: the `tiny` preset with seed 0, written as K shards (the same weights for every K)."""
    from llama.checkpoint import write_random_checkpoint

    written = {}

    def make(model_parallel_size: int = 1) -> Path:
        if model_parallel_size not in written:
            dst = tmp_path_factory.mktemp(f"tiny-mp{model_parallel_size}")
            written[model_parallel_size] = write_random_checkpoint(dst, "tiny", model_parallel_size, seed=0)
        return written[model_parallel_size]

    return make


@pytest.fixture(scope="session")
def build_tiny(tiny_checkpoint):
    """`build_tiny(**kwargs)`: a float32 CPU `Llama` on the one-shard tiny checkpoint."""
    from llama import Llama

    def build(**kwargs) -> "Llama":
        return Llama.build(tiny_checkpoint(1), device="cpu", dtype=torch.float32, **kwargs)

    return build


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_checkpoint):
    """HF transformers' `LlamaForCausalLM` holding the tiny checkpoint's weights, float32: an independent model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama.checkpoint import hf_config_dict, load_shard, meta_to_hf_state_dict, read_params
    from llama.model import ModelArgs

    ckpt = tiny_checkpoint(1)
    args = ModelArgs.from_params(read_params(ckpt))
    state_dict = {k: v.float() for k, v in load_shard(ckpt / "consolidated.00.pth").items()}
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(args))).eval()
    model.load_state_dict(meta_to_hf_state_dict(state_dict, args), strict=True)
    return model
