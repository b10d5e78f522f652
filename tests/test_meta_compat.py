"""Code written for Meta's llama3 package runs here unchanged: its import lines and its call shapes.

The import lines are those of meta-llama/llama3 (its scripts, `llama/__init__.py` and `llama/generation.py`), and
together they name every public name of Meta's `llama/__init__.py`, `model.py`, `tokenizer.py` and
`generation.py`. The calls are the ones Meta's `Llama.build` and `generate` make: ModelArgs from params.json,
`Transformer(model_args)`, `load_state_dict` on a `consolidated.00.pth` (Meta's keys, `strict=False`),
`Llama(model, tokenizer)` and `model.forward(tokens[:, prev_pos:cur_pos], prev_pos)`.
"""

import json
from pathlib import Path

import pytest
import torch

from llama import Dialog, Llama  # example_chat_completion.py
from llama import Llama as TopLevelLlama, ModelArgs as TopLevelModelArgs, Tokenizer as TopLevelTokenizer  # noqa: F401
from llama import Transformer as TopLevelTransformer  # noqa: F401  (the rest of Meta's llama/__init__.py)
from llama.generation import ChatPrediction, CompletionPrediction, sample_top_p  # noqa: F401
from llama.model import (Attention, FeedForward, ModelArgs, RMSNorm, Transformer,  # noqa: F401
                         TransformerBlock, apply_rotary_emb, precompute_freqs_cis, repeat_kv, reshape_for_broadcast)
from llama.model import apply_rope, rope_table
from llama.tokenizer import ChatFormat, Dialog as TokenizerDialog, Message, Role, Tokenizer  # noqa: F401


def meta_build(ckpt_dir: Path, tokenizer_path: Path, max_seq_len: int, max_batch_size: int) -> Llama:
    """The steps of Meta's `Llama.build` after the process group, with its calls' shapes, on the CPU in float32."""
    checkpoint = torch.load(sorted(ckpt_dir.glob("*.pth"))[0], map_location="cpu")
    with open(ckpt_dir / "params.json", "r") as f:
        params = json.loads(f.read())
    model_args: ModelArgs = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
    tokenizer = Tokenizer(model_path=str(tokenizer_path))
    assert model_args.vocab_size == tokenizer.n_words
    model = Transformer(model_args)
    model.load_state_dict(checkpoint, strict=False)
    return Llama(model, tokenizer)


@pytest.fixture(scope="module")
def meta_built(tiny_checkpoint) -> Llama:
    ckpt_dir = tiny_checkpoint(1)
    return meta_build(ckpt_dir, ckpt_dir / "tokenizer.model", max_seq_len=64, max_batch_size=3)


def test_load_state_dict_takes_metas_keys_strict_or_not(tiny_checkpoint, build_tiny):
    checkpoint = torch.load(tiny_checkpoint(1) / "consolidated.00.pth", weights_only=True)
    assert "layers.0.attention.wq.weight" in checkpoint and "layers.0.feed_forward.w1.weight" in checkpoint
    args = ModelArgs(max_seq_len=16, max_batch_size=2, **json.loads((tiny_checkpoint(1) / "params.json").read_text()))
    loose, strict = Transformer(args), Transformer(args)
    result = loose.load_state_dict(checkpoint, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []  # nothing left at its random init
    strict.load_state_dict(checkpoint, strict=True)
    assert "layers.0.attention.wq.weight" in checkpoint  # the caller's dict is left as it was
    loaded = build_tiny(max_seq_len=16, max_batch_size=2).model  # the checkpoint loader's stacked weights
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    expected = loaded(tokens)
    torch.testing.assert_close(loose(tokens), expected, rtol=0, atol=0)
    torch.testing.assert_close(strict(tokens), expected, rtol=0, atol=0)


def test_a_model_built_as_metas_build_does_generates_what_llama_build_generates(meta_built, build_tiny, prompts):
    built = build_tiny(max_seq_len=64, max_batch_size=3)
    expected = built.text_completion(prompts, temperature=0, max_gen_len=10)
    assert meta_built.text_completion(prompts, temperature=0, max_gen_len=10) == expected
    dialogs: list[Dialog] = [[{"role": "user", "content": "what is the recipe of mayonnaise?"}]]
    results: list[ChatPrediction] = meta_built.chat_completion(dialogs, max_gen_len=8, temperature=0)
    assert results == built.chat_completion(dialogs, max_gen_len=8, temperature=0)


def test_metas_decoding_loop_over_forward_gives_the_greedy_tokens(meta_built):
    """Meta's `generate` calls `model.forward(tokens[:, prev_pos:cur_pos], prev_pos)`: a prompt, then one token at a
    time, every row from KV slot 0."""
    prompt = meta_built.tokenizer.encode("The capital of France is", bos=True, eos=False)
    tokens = torch.tensor([prompt, prompt])
    prev_pos = 0
    for cur_pos in range(len(prompt), len(prompt) + 6):
        logits = meta_built.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
        next_token = torch.argmax(logits[:, -1], dim=-1)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        prev_pos = cur_pos
    expected, _ = meta_built.generate([prompt], max_gen_len=6, temperature=0)
    assert tokens[0, len(prompt):].tolist() == tokens[1, len(prompt):].tolist()
    assert tokens[0, len(prompt):len(prompt) + len(expected[0])].tolist() == expected[0]


def test_sample_top_p_takes_metas_arguments():
    probs = torch.tensor([[0.05, 0.9, 0.05], [0.6, 0.1, 0.3]])
    next_token = sample_top_p(probs, 0.5)  # Meta's call: (probs, p), a column of token ids
    assert next_token.shape == (2, 1) and next_token.reshape(-1).tolist() == [1, 0]


@pytest.mark.parametrize("use_scaled", [False, True])
def test_metas_rope_functions_rotate_as_the_model_does(use_scaled):
    head_dim, seqlen, theta = 64, 40, 500000.0
    freqs_cis = precompute_freqs_cis(head_dim, seqlen, theta, use_scaled=use_scaled)
    assert freqs_cis.dtype == torch.complex64 and freqs_cis.shape == (seqlen, head_dim // 2)
    xq, xk = torch.randn(2, seqlen, 4, head_dim), torch.randn(2, seqlen, 2, head_dim)
    rotated_q, rotated_k = apply_rotary_emb(xq, xk, freqs_cis)
    args = ModelArgs(dim=4 * head_dim, n_heads=4, max_seq_len=seqlen, rope_theta=theta, use_scaled_rope=use_scaled)
    table = rope_table(args)[None]  # the model's real-valued form
    torch.testing.assert_close(rotated_q, apply_rope(xq, table))
    torch.testing.assert_close(rotated_k, apply_rope(xk, table))
    assert reshape_for_broadcast(freqs_cis, torch.zeros(2, seqlen, 4, head_dim // 2)).shape == (1, seqlen, 1, 32)
    with pytest.raises(ValueError, match="does not match"):
        reshape_for_broadcast(freqs_cis, torch.zeros(2, seqlen + 1, 4, head_dim // 2))


def test_repeat_kv_gives_each_query_head_its_kv_head():
    x = torch.randn(2, 5, 3, 8)  # (bsz, seqlen, n_kv_heads, head_dim)
    repeated = repeat_kv(x, 4)
    assert repeated.shape == (2, 5, 12, 8)
    for head in range(12):
        assert torch.equal(repeated[:, :, head], x[:, :, head // 4])


def test_metas_defaults_and_names():
    args = ModelArgs()  # Meta's defaults: the 8B shape, 32 slots of 2048 positions
    assert (args.dim, args.n_layers, args.n_heads, args.max_batch_size, args.max_seq_len) == (4096, 32, 32, 32, 2048)
    with torch.device("meta"):
        model = Transformer(args)
    assert model.params is args
    assert torch.equal(RMSNorm(8).weight, torch.ones(8)) and RMSNorm(8).eps == 1e-6
    assert Message.__annotations__["role"] is Role
    assert TokenizerDialog is Dialog and isinstance(ChatFormat, type)
