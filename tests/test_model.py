"""The transformer computes what HF transformers' `LlamaForCausalLM` computes, on one process or split over two,
and `ModelArgs` / Meta's layout describe the published model shapes."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llama.args import PRESETS, ModelArgs
from llama.checkpoint.hf import meta_to_hf_state_dict
from llama.checkpoint.hf_config import hf_config_dict
from llama.checkpoint.layout import check_model_parallel_size, n_local_kv_heads, param_shapes
from llama.checkpoint.load import load_model
from llama.checkpoint.random_weights import write_random_checkpoint
from llama.model import Transformer

LLAMA3 = {"vocab_size": 128256, "norm_eps": 1e-05, "rope_theta": 500000.0}
REAL_CONFIGS = {
    "1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 256,
           "ffn_dim_multiplier": 1.5, "use_scaled_rope": True, **LLAMA3},
    "3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "multiple_of": 256,
           "ffn_dim_multiplier": 1.0, "use_scaled_rope": True, **LLAMA3},
    "8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024,
           "ffn_dim_multiplier": 1.3, **LLAMA3},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
            "ffn_dim_multiplier": 1.3, **LLAMA3},
    "405B": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "multiple_of": 4096,
             "ffn_dim_multiplier": 1.2, "use_scaled_rope": True, **LLAMA3},
}
# HF configs' intermediate_size. 1B: int(8*2048/3) = 5461, *1.5 -> 8191, up to a multiple of 256 -> 8192.
# 3B: int(8*3072/3) = 8192, *1.0 -> 8192, already a multiple of 256.
FFN_HIDDEN = {"1B": 8192, "3B": 8192, "8B": 14336, "70B": 28672, "405B": 53248}
# Published totals for 8B/70B/405B; 1B/3B are HF's tied totals plus the separate output matrix
# Meta's checkpoints carry (1_235_814_400 + 128256*2048, 3_212_749_824 + 128256*3072).
# 8 kv heads of head_dim 128, except the 1B whose heads are 64 wide (HF config: head_dim 64).
KV_DIM = {"1B": 512, "3B": 1024, "8B": 1024, "70B": 1024, "405B": 1024}
PARAM_COUNTS = {"1B": 1_498_482_688, "3B": 3_606_752_256, "8B": 8_030_261_248,
                "70B": 70_553_706_496, "405B": 405_853_388_800}



@pytest.fixture(scope="module")
def small_weights(small_params, tmp_path_factory) -> dict:
    path = write_random_checkpoint(tmp_path_factory.mktemp("small"), small_params, seed=1, dtype=torch.float32)
    return torch.load(path / "consolidated.00.pth", weights_only=True)


def test_from_params_ignores_unknown_keys_with_warning():
    with pytest.warns(UserWarning, match="made_up_key"):
        args = ModelArgs.from_params({**REAL_CONFIGS["8B"], "made_up_key": 1})
    assert not hasattr(args, "made_up_key")
    assert args.dim == 4096 and args.n_kv_heads == 8


def test_from_params_takes_llama31_keys_and_overrides():
    args = ModelArgs.from_params({**REAL_CONFIGS["1B"], "rope_scaling_factor": 32.0}, max_seq_len=128, max_batch_size=3)
    assert args.use_scaled_rope is True and args.rope_scaling_factor == 32.0
    assert (args.max_seq_len, args.max_batch_size) == (128, 3)
    assert ModelArgs.from_params(REAL_CONFIGS["8B"]).rope_scaling_factor == 8.0
    assert ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 10}).n_kv_heads == 4


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_heads": 48}, "dim .* divisible by n_heads"),
        ({"n_kv_heads": 12}, "divisible by n_kv_heads"),
        ({"n_heads": 0}, "n_heads must be a positive integer"),
        ({"n_layers": -1}, "n_layers must be a positive integer"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"vocab_size": None}, "missing required key.*vocab_size"),
    ],
)
def test_from_params_rejects_bad_shapes(change, match):
    params = {**REAL_CONFIGS["8B"], **change}
    params = {k: v for k, v in params.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_params(params)


def test_from_params_rejects_unknown_override():
    with pytest.raises(ValueError, match="max_seqlen"):
        ModelArgs.from_params(REAL_CONFIGS["8B"], max_seqlen=10)


@pytest.mark.parametrize("name", FFN_HIDDEN)
def test_ffn_hidden_dim_of_real_configs(name):
    assert ModelArgs.from_params(REAL_CONFIGS[name]).ffn_hidden_dim == FFN_HIDDEN[name]


def test_model_parallel_size_must_split_heads_evenly():
    args = ModelArgs.from_params(PRESETS["tiny"])  # 4 heads, 2 kv heads
    check_model_parallel_size(args, 2)
    check_model_parallel_size(args, 4)  # each kv head replicated on the 2 shards whose query heads use it
    assert [n_local_kv_heads(args, mp) for mp in (1, 2, 4)] == [2, 1, 1]
    with pytest.raises(ValueError, match="does not divide n_heads"):
        check_model_parallel_size(args, 8)
    six_way = ModelArgs(dim=192, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=120, multiple_of=48)
    with pytest.raises(ValueError, match="n_kv_heads"):
        check_model_parallel_size(six_way, 6)  # 4 kv heads cannot be spread over 6 shards
    with pytest.raises(ValueError, match="model_parallel_size"):
        check_model_parallel_size(args, 0)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_have_the_published_sizes(name):
    args = ModelArgs.from_params(REAL_CONFIGS[name])
    shapes = param_shapes(args)  # Meta's checkpoint layout
    assert sum(torch.Size(s).numel() for s in shapes.values()) == PARAM_COUNTS[name]
    assert shapes["layers.0.attention.wk.weight"] == (KV_DIM[name], args.dim)
    assert shapes["layers.0.feed_forward.w2.weight"] == (args.dim, FFN_HIDDEN[name])
    with torch.device("meta"):  # allocates nothing, so even 405B builds
        state = Transformer(args).state_dict()
    assert all(t.is_meta for t in state.values())
    assert sum(t.numel() for t in state.values()) == PARAM_COUNTS[name]
    assert state["layers.0.attention.wqkv.weight"].shape == (args.dim + 2 * KV_DIM[name], args.dim)
    assert state["layers.0.feed_forward.w13.weight"].shape == (2 * FFN_HIDDEN[name], args.dim)
    assert state["output.weight"].shape == (128256, args.dim)


def hf_logits(params: dict, state_dict: dict, tokens: torch.Tensor) -> torch.Tensor:
    # Imported here, not at the top: the spawned model-parallel workers import this module and
    # would otherwise pay for importing transformers.
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ModelArgs.from_params(params)
    config = LlamaConfig(**hf_config_dict(args), attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(meta_to_hf_state_dict(state_dict, args), strict=True)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("scaled, seqlen", [(False, 64), (True, 2048)])
def test_logits_match_hf_transformers(small_params, model_from_meta, rel_err, small_weights, scaled, seqlen):
    params = {**small_params, "use_scaled_rope": scaled}
    tokens = torch.randint(0, small_params["vocab_size"], (2, seqlen), generator=torch.Generator().manual_seed(0))
    ours = model_from_meta(params, small_weights, max_seq_len=seqlen, max_batch_size=2)(tokens)
    ref = hf_logits(params, small_weights, tokens)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (2, seqlen, small_params["vocab_size"])
    assert rel_err(ours, ref) <= 1e-4
    if scaled:
        # Positions up to 2048 make the scaled bands matter: without scaling the logits are far off.
        unscaled = model_from_meta(small_params, small_weights, max_seq_len=seqlen, max_batch_size=2)(tokens)
        assert rel_err(unscaled, ref) > 100 * 1e-4


def test_kv_cache_decoding_matches_full_forward(small_params, model_from_meta, rel_err, small_weights):
    params = {**small_params, "use_scaled_rope": True}
    model = model_from_meta(params, small_weights, max_seq_len=32, max_batch_size=3)
    tokens = torch.randint(0, small_params["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(2))
    full = model(tokens)

    one_by_one = torch.cat([model(tokens[:, i : i + 1], i) for i in range(20)], dim=1)
    assert rel_err(one_by_one, full) < 1e-5

    bounds = [0, 7, 8, 13, 20]  # chunks of 7, 1, 5, 7 tokens: seqlen > 1 at start_pos > 0
    chunked = torch.cat([model(tokens[:, a:b], a) for a, b in zip(bounds, bounds[1:])], dim=1)
    assert rel_err(chunked, full) < 1e-5

    with torch.inference_mode():
        last = model.step(tokens, torch.zeros(3, dtype=torch.long), kv_len=20, last_logits_only=True)
    assert last.shape == (3, 1, small_params["vocab_size"])
    assert rel_err(last, full[:, -1:]) < 1e-6


def test_forward_rejects_bad_positions(small_params, model_from_meta, small_weights):
    model = model_from_meta(small_params, small_weights, max_seq_len=16, max_batch_size=2)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(tokens, 13)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="start_pos=4 needs the KV cache"):
        model(tokens, 4)  # nothing cached yet
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model(tokens.float())


def test_the_kv_cache_stays_out_of_the_state_dict(small_params, model_from_meta, small_weights):
    model = model_from_meta(small_params, small_weights, max_seq_len=16, max_batch_size=2)
    before = list(model.state_dict())
    model(torch.zeros(2, 4, dtype=torch.long))
    assert model.layers[0].attention.kv_cache is not None and list(model.state_dict()) == before


def test_the_cache_follows_the_models_dtype(small_params, model_from_meta, rel_err, small_weights):
    model = model_from_meta(small_params, small_weights, max_seq_len=16, max_batch_size=2)
    tokens = torch.randint(0, small_params["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))
    ref = model(tokens)
    model.to(torch.bfloat16)
    low = model(tokens)
    assert model.layers[0].attention.kv_cache.k.dtype == torch.bfloat16
    assert low.dtype == torch.float32 and 0 < rel_err(low, ref) < 0.1
    model.to(torch.float32)  # float32 again, but with the weights rounded to bfloat16 on the way
    rounded = model_from_meta(small_params, {k: v.bfloat16().float() for k, v in small_weights.items()}, max_seq_len=16, max_batch_size=2)
    assert rel_err(model(tokens), rounded(tokens)) < 1e-6
    assert model.layers[0].attention.kv_cache.k.dtype == torch.float32


def _run_rank(rank: int, port: int, ckpt: str, tokens: torch.Tensor, out: str, params: dict) -> None:
    from fairscale.nn.model_parallel import initialize as fs_init

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    fs_init.initialize_model_parallel(2)
    args = ModelArgs.from_params(params, max_seq_len=16, max_batch_size=2)
    model = load_model(Path(ckpt), args, rank, 2, torch.device("cpu"), torch.float32)
    logits = torch.cat([model(tokens[:, :5]), model(tokens[:, 5:], 5)], dim=1)
    if rank == 0:
        torch.save(logits, out)
    dist.destroy_process_group()


def test_two_way_model_parallel_matches_single_process(small_params, model_from_meta, rel_err, free_port, small_weights, tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "mp2", small_params, model_parallel_size=2, seed=1, dtype=torch.float32)
    port = free_port
    tokens = torch.randint(0, small_params["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    torch.multiprocessing.spawn(_run_rank, args=(port, str(ckpt), tokens, str(tmp_path / "out.pt"), small_params), nprocs=2)
    expected = model_from_meta(small_params, small_weights, max_seq_len=16, max_batch_size=2)(tokens)
    assert rel_err(torch.load(tmp_path / "out.pt"), expected) < 1e-5


@torch.inference_mode()
def test_a_step_puts_each_row_at_its_own_position(build_tiny):
    model = build_tiny(max_seq_len=32, max_batch_size=3).model
    prompts = [[128000, 791, 6864], [128000, 9906, 11, 1268, 527, 499], [128000, 16]]
    alone = []
    for slot, prompt in enumerate(prompts):  # each prompt into its own KV slot; the next token's logits alone
        model.step(torch.tensor([prompt]), torch.tensor([0]), slot=slot, kv_len=len(prompt))
        position = torch.tensor([len(prompt) - 1])
        alone.append(model.step(torch.tensor([[prompt[-1]]]), position, slot=slot, kv_len=len(prompt))[0, -1])
    # One step for all three rows: row i is slot i at its own position (its last prompt token again).
    positions = torch.tensor([len(p) - 1 for p in prompts])
    last_tokens = torch.tensor([[p[-1]] for p in prompts])
    together = model.step(last_tokens, positions, kv_len=max(map(len, prompts)))[:, -1]
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)
    # The whole cache under a mask, as compiled decoding reads it: the same logits
    whole_cache = model.step(last_tokens, positions)[:, -1]
    torch.testing.assert_close(whole_cache, together, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_step_verifies_several_tokens_per_row_each_row_at_its_own_position(small_params, model_from_meta, rel_err,
                                                                             small_weights):
    """What speculative decoding asks: rows that have reached different lengths each take a run of tokens."""
    model = model_from_meta(small_params, small_weights, max_seq_len=32, max_batch_size=3)
    tokens = torch.randint(0, small_params["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(5))
    full = model(tokens)  # Meta's forward: every row from position 0
    model.setup_caches()
    filled = [3, 9, 6]
    for slot, n in enumerate(filled):  # a prompt of its own length in each slot
        model.step(tokens[slot : slot + 1, :n], torch.tensor([0]), slot=slot, kv_len=n)
    runs = torch.stack([tokens[slot, n : n + 4] for slot, n in enumerate(filled)])  # 4 more tokens each
    logits = model.step(runs, torch.tensor(filled), kv_len=max(filled) + 4)
    for slot, n in enumerate(filled):
        assert rel_err(logits[slot], full[slot, n : n + 4]) < 1e-5


def test_step_refuses_what_does_not_fit_before_any_work(build_tiny):
    model = build_tiny(max_seq_len=32, max_batch_size=3).model
    ok = torch.zeros(2, 4, dtype=torch.long)
    cases = [((ok, torch.zeros(3, dtype=torch.long)), "start_pos must be an int64 tensor of shape \\(2,\\)"),
             ((ok, torch.zeros(2, dtype=torch.long), 2), "slot \\(2\\) \\+ rows \\(2\\)"),
             ((ok, torch.zeros(2, dtype=torch.long), 0, 33), "max_seq_len=32"),
             ((ok, torch.zeros(2, dtype=torch.long), 0, 3), "at most kv_len \\(3\\)"),
             ((ok.float(), torch.zeros(2, dtype=torch.long)), "tokens must be an integer tensor")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model.step(*args)
    fresh = type(model)(model.args)
    with pytest.raises(ValueError, match="call setup_caches\\(\\) first"):
        fresh.step(ok, torch.zeros(2, dtype=torch.long))


@torch.inference_mode()
def test_a_step_over_a_tensor_of_slots_with_ragged_rows_equals_separate_steps(build_tiny):
    model = build_tiny(max_seq_len=32, max_batch_size=3).model
    prompts = [[128000, 791, 6864, 315, 9822], [128000, 9906], [128000, 16, 11, 17]]
    slots = [2, 0, 1]  # neither in order nor from 0
    alone = [model.step(torch.tensor([p]), torch.tensor([0]), slot=s, kv_len=len(p))[0] for p, s in zip(prompts, slots)]
    width = max(map(len, prompts))
    padded = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    model.setup_caches()
    together = model.step(padded, torch.zeros(3, dtype=torch.long), slot=torch.tensor(slots), kv_len=width,
                          seq_lens=lengths)
    last = model.step(padded, torch.zeros(3, dtype=torch.long), slot=torch.tensor(slots), kv_len=width,
                      last_logits_only=True, seq_lens=lengths)
    for row, (prompt, logits) in enumerate(zip(prompts, alone)):
        torch.testing.assert_close(together[row, : len(prompt)], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(last[row, 0], logits[-1], rtol=1e-5, atol=1e-5)
    # The next token of each, one decode step over the slots in their own order: the cache holds each prompt.
    nxt = model.step(torch.tensor([[5], [6], [7]]), lengths, slot=torch.tensor(slots), kv_len=width + 1)[:, -1]
    for row, prompt in enumerate(prompts):
        model.step(torch.tensor([prompt]), torch.tensor([0]), slot=0, kv_len=len(prompt))
        expected = model.step(torch.tensor([[5 + row]]), torch.tensor([len(prompt)]), slot=0, kv_len=len(prompt) + 1)
        torch.testing.assert_close(nxt[row], expected[0, -1], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_copy_prefix_gives_another_slot_the_same_keys_and_values(build_tiny):
    model = build_tiny(max_seq_len=32, max_batch_size=3).model
    model.setup_caches()
    prompt = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    model.step(prompt[:, :5], torch.tensor([0]), slot=0, kv_len=5)
    model.copy_prefix(0, 2, 5)
    copied = model.step(prompt[:, 5:], torch.tensor([5]), slot=2, kv_len=6)
    torch.testing.assert_close(copied[0, -1], model.step(prompt, torch.tensor([0]), slot=1, kv_len=6)[0, -1],
                               rtol=1e-5, atol=1e-5)
    for args, message in [((0, 3, 5), "dst_slot must be an int in \\[0, 3\\)"), ((1, 1, 5), "must differ"),
                          ((0, 1, 33), "length must be an int in \\[0, max_seq_len=32\\]")]:
        with pytest.raises(ValueError, match=message):
            model.copy_prefix(*args)


def test_step_refuses_bad_slot_tensors_and_seq_lens(build_tiny):
    model = build_tiny(max_seq_len=32, max_batch_size=3).model
    ok, starts = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    cases = [({"slot": torch.tensor([0, 1, 2])}, "slot as a tensor must be int64 of shape \\(2,\\)"),
             ({"slot": torch.tensor([0, 1], dtype=torch.int32)}, "slot as a tensor must be int64"),
             ({"slot": 1.0}, "slot \\(1.0\\) \\+ rows \\(2\\)"),
             ({"seq_lens": torch.tensor([4])}, "seq_lens must be None or an int64 tensor of shape \\(2,\\)"),
             ({"seq_lens": [4, 4]}, "seq_lens must be None or an int64 tensor")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.step(ok, starts, **kwargs)
