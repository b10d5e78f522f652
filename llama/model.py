"""The Llama 3.x transformer: plain PyTorch, one class per part, nothing about files, processes or kernels.

Each attention layer computes q, k and v with one matmul (`wqkv`: Meta's wq, wk and wv stacked by rows) and each
feed-forward layer its gate and up projections with another (`w13`: w1 and w3 stacked); `load_state_dict` takes
Meta's keys and stacks them. Tensor parallelism (`llama.parallel`), int8 and CPU kernels (`llama.kernels`) and
compiled decoding (`llama.compile`) are applied to a built model from outside.

Two entry points: `Transformer.setup_caches()` once, then `Transformer.step(tokens, start_pos, ...)` for every
prefill chunk, one-token decode step or run of proposed tokens, each row at its own position. Meta's
`forward(tokens, start_pos)` is a thin call of `step`.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.args import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs

# Meta's checkpoint keys that the model holds stacked by rows, per module: Attention's and FeedForward's.
STACKED_META_KEYS = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel computes x * rsqrt(mean(x²) + eps) in one pass instead of five
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def frequencies(head_dim: int, theta: float, scaling_factor: Optional[float] = None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Rotation speed (radians per position) of each pair of a head's dims, float32, shape (head_dim // 2,);
    with Llama 3.1's scaling by `scaling_factor` unless it is None."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling_factor is None:
        return freqs
    # Llama 3.1 scaling: slow rotations (wavelength above the original context) are slowed down by the
    # factor, fast ones (wavelength below context / 4) are kept, and the band between blends the two.
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    blend = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - blend) * freqs / scaling_factor + blend * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_frequencies(args: ModelArgs, device: Optional[torch.device] = None) -> torch.Tensor:
    """`frequencies` of the model `args` describes."""
    return frequencies(args.head_dim, args.rope_theta, args.rope_scaling_factor if args.use_scaled_rope else None,
                       device)


def rope_table(args: ModelArgs, device: Optional[torch.device] = None) -> torch.Tensor:
    """cos and signed sin of every position's rotation angles per head dim, float32, (max_seq_len, 2, 1, head_dim).

    Both dims of pair i (2i and 2i + 1) carry pair i's angle; the sin row is negated at the even dims, so that
    `apply_rope` rotates with two products and one sum.
    """
    positions = torch.arange(args.max_seq_len, device=device).float()
    angles = torch.outer(positions, rope_frequencies(args, device)).repeat_interleave(2, dim=-1)
    sign = torch.tensor([-1.0, 1.0], device=device).repeat(args.head_dim // 2)
    return torch.stack([angles.cos(), angles.sin() * sign], dim=1)[:, :, None]


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by its angle (Meta's interleaved layout):
    (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos).

    x: (bsz, seqlen, n_heads, head_dim); table: `rope_table` rows of each token's position, (bsz, seqlen, 2, 1,
    head_dim), or (1, seqlen, ...) for the same positions in every row.
    """
    cos, signed_sin = table.unbind(2)  # each (1 or bsz, seqlen, 1, head_dim)
    values = x.float()
    swapped = values.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # x[2i + 1] at 2i and x[2i] at 2i + 1
    return (values * cos + swapped * signed_sin).type_as(x)


# Meta's reference functions (llama/model.py of meta-llama/llama3), for code written against them. The model
# itself rotates with the real-valued `rope_table`, and never repeats keys and values.


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, use_scaled: bool = False) -> torch.Tensor:
    """e^(i * position * frequency) for positions [0, end): complex64, (end, dim // 2). `use_scaled` applies
    Llama 3.1's scaling with Meta's factor 8."""
    angles = torch.outer(torch.arange(end).float(), frequencies(dim, theta, 8.0 if use_scaled else None))
    return torch.polar(torch.ones_like(angles), angles)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`freqs_cis` (seqlen, pairs) viewed as (1, seqlen, 1, ..., pairs) to multiply x (bsz, seqlen, ..., pairs)."""
    if x.ndim < 2 or freqs_cis.shape != (x.shape[1], x.shape[-1]):
        raise ValueError(f"freqs_cis of shape {tuple(freqs_cis.shape)} does not match x of shape {tuple(x.shape)}: "
                         "it must be (x.shape[1], x.shape[-1])")
    return freqs_cis.view(*[size if i in (1, x.ndim - 1) else 1 for i, size in enumerate(x.shape)])


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys (bsz, seqlen, heads, head_dim) by `freqs_cis` rows of their positions, as complex
    products over consecutive pairs; the same numbers as `apply_rope`."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * reshape_for_broadcast(freqs_cis, pairs)).flatten(-2).type_as(x)

    return rotate(xq), rotate(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Each kv head of x (bsz, seqlen, n_kv_heads, head_dim) repeated n_rep times, for the query heads it serves."""
    return x.repeat_interleave(n_rep, dim=2)


def _stack_meta_keys(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: Meta's separate tensors (wq, wk, wv; w1, w3) stacked into the model's one."""
    for stacked, sources in STACKED_META_KEYS.items():
        keys = [f"{prefix}{source}.weight" for source in sources]
        if hasattr(module, stacked) and all(key in state_dict for key in keys):
            state_dict[f"{prefix}{stacked}.weight"] = torch.cat([state_dict.pop(key) for key in keys])


class KVCache(nn.Module):
    """One attention layer's keys and values: `slots` sequences x `max_seq_len` positions. Buffers (they move with
    `.to()`), but not part of `state_dict()`."""

    def __init__(self, slots: int, max_seq_len: int, n_kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        super().__init__()
        shape = (slots, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=like.device, dtype=like.dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=like.device, dtype=like.dtype), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, slot: "int | torch.Tensor", positions: torch.Tensor,
               kv_len: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (rows, seqlen, n_kv_heads, head_dim) of slots [slot, slot + rows) (or of the slots the
        tensor `slot` (rows,) names) at `positions` (rows, seqlen); return those slots' positions [0, kv_len) (all
        of them for None), (rows, kv_len, n_kv, hd): a view for contiguous slots, a copy for a tensor of them."""
        end = self.k.shape[1] if kv_len is None else kv_len
        if isinstance(slot, torch.Tensor):
            self.k.index_put_((slot[:, None], positions), k)
            self.v.index_put_((slot[:, None], positions), v)
            return self.k[slot, :end], self.v[slot, :end]
        rows = torch.arange(slot, slot + k.shape[0], device=k.device)[:, None]
        self.k.index_put_((rows, positions), k)
        self.v.index_put_((rows, positions), v)
        return self.k[slot : slot + k.shape[0], :end], self.v[slot : slot + k.shape[0], :end]


class Attention(nn.Module):
    """Grouped-query self-attention over a KV cache (`kv_cache`, allocated by `Transformer.setup_caches`)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # Heads this module computes: all of them, until tensor parallelism gives it its share.
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.decode_step: Optional[Callable[..., Optional[torch.Tensor]]] = None  # see forward; set by llama.kernels
        self.register_load_state_dict_pre_hook(_stack_meta_keys)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor],
                slot: "int | torch.Tensor", kv_len: Optional[int]) -> torch.Tensor:
        """x (rows, seqlen, dim) at `positions` (rows, seqlen) of KV slots [slot, slot + rows) (or those of the tensor
        `slot`). `mask` (rows, 1, seqlen, kv_len) says which cached positions each new one sees; None: causal."""
        bsz, seqlen, _ = x.shape
        # An eager one-token step's whole attention in a device's kernels, or None where they do not apply.
        if seqlen == 1 and self.decode_step is not None and not torch.compiler.is_compiling():
            if (out := self.decode_step(self, x, positions, rope, mask, slot, kv_len)) is not None:
                return out
        kv_width = self.n_kv_heads * self.head_dim
        qk, v = self.wqkv(x).split([(self.n_heads + self.n_kv_heads) * self.head_dim, kv_width], dim=-1)
        # Queries and keys rotate alike: one rope over both heads' kinds, then the split.
        qk = apply_rope(qk.view(bsz, seqlen, self.n_heads + self.n_kv_heads, self.head_dim), rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        keys, values = self.kv_cache.update(k, v, slot, positions, kv_len)  # (bsz, kv_len, n_kv_heads, head_dim)
        if seqlen == 1:
            out = self._decode_attention(q, keys, values, mask)
        else:
            # sdpa wants heads before positions; enable_gqa lets each kv head serve its group of query heads.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                is_causal=mask is None, enable_gqa=True,
            ).transpose(1, 2)  # (bsz, seqlen, n_heads, head_dim)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          visible: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention of one new token per row over the cached positions `visible` (bsz, 1, 1, kv_len; None: all of
        them): two batched matmuls (on the CPU faster than sdpa for one query position) with the query heads that
        share a kv head stacked against it (no repeated K/V)."""
        bsz = q.shape[0]
        group = self.n_heads // self.n_kv_heads
        q = q.view(bsz, self.n_kv_heads, group, self.head_dim)  # query head h uses kv head h // group
        # keys @ q^T, then transposed: the cache slice is then the matmul's row-major operand, which torch's CPU
        # kernels read as it is (q @ keys^T, the same numbers, is slower in bfloat16 on the CPU).
        scores = torch.matmul(keys.permute(0, 2, 1, 3), q.transpose(-1, -2))  # (bsz, n_kv, kv_len, group)
        scores = scores.transpose(-1, -2) * self.head_dim**-0.5  # (bsz, n_kv, group, kv_len)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(q)
        out = torch.matmul(probs, values.transpose(1, 2))  # (bsz, n_kv, group, head_dim)
        return out.reshape(bsz, 1, self.n_heads, self.head_dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), with w1 and w3 stacked in `w13`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.register_load_state_dict_pre_hook(_stack_meta_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then feed-forward."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor],
                slot: "int | torch.Tensor", kv_len: Optional[int]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rope, mask, slot, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 3 decoder.

    Parameters are created on the current default device and dtype (build under `torch.device("meta")` to
    allocate nothing), to be filled by a checkpoint loader (`llama.checkpoint.load`) or `load_state_dict` (Meta's
    keys or the stacked ones). Then `setup_caches()`, and `step()` (or Meta's `forward`).
    """

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        self.args = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # float32 cos/sin table and position indices: plain attributes, so that `.to(dtype)` keeps them float32.
        self.rope: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None

    @property
    def params(self) -> ModelArgs:
        """Meta's name for `args`."""
        return self.args

    def setup_caches(self) -> None:
        """Allocate every layer's KV cache, zeroed (max_batch_size slots x max_seq_len positions of `args`, for the
        heads each layer computes), and the rope table, on the weights' device in the activations' dtype. Call it
        once the weights are in place (and sharded); calling it again starts from empty caches."""
        like = self.norm.weight
        if like.is_meta:
            raise ValueError("setup_caches() needs the weights in place; the model is still on the meta device")
        slots, max_seq_len = self.args.max_batch_size, self.args.max_seq_len
        for layer in self.layers:
            attention = layer.attention
            attention.kv_cache = KVCache(slots, max_seq_len, attention.n_kv_heads, attention.head_dim, like)
        self.rope = rope_table(self.args, like.device)
        self.positions = torch.arange(max_seq_len, device=like.device)

    def check_inputs(self, tokens: torch.Tensor, start_pos: torch.Tensor, slot: "int | torch.Tensor",
                     kv_len: Optional[int], seq_lens: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError unless `step`'s arguments fit the model. Checks shapes, not the values of the tensors
        `start_pos`, `slot` and `seq_lens` (that would wait for the device)."""
        args, device = self.args, self.norm.weight.device
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor of shape (rows, seqlen), got {_describe(tokens)}")
        rows, seqlen = tokens.shape
        if not 1 <= rows <= args.max_batch_size:
            raise ValueError(f"{rows} rows of tokens; there must be between 1 and max_batch_size={args.max_batch_size}")
        if isinstance(slot, torch.Tensor):
            if slot.shape != (rows,) or slot.dtype != torch.int64 or slot.device != device:
                raise ValueError(f"slot as a tensor must be int64 of shape ({rows},) on {device}, one slot per row, "
                                 f"got {_describe(slot)} on {slot.device}")
        elif isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= args.max_batch_size - rows:
            raise ValueError(f"slot ({slot!r}) + rows ({rows}) must be within max_batch_size={args.max_batch_size}, "
                             "slot an int >= 0 (or an int64 tensor of slots)")
        if seq_lens is not None and (not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (rows,)
                                     or seq_lens.dtype != torch.int64 or seq_lens.device != device):
            raise ValueError(f"seq_lens must be None or an int64 tensor of shape ({rows},) on {device}, one length "
                             f"per row, got {_describe(seq_lens)}")
        if not 1 <= seqlen <= (args.max_seq_len if kv_len is None else kv_len) <= args.max_seq_len:
            raise ValueError(f"seqlen ({seqlen}) must be >= 1 and at most kv_len ({kv_len}), which must be at most "
                             f"max_seq_len={args.max_seq_len}")
        if not isinstance(start_pos, torch.Tensor) or start_pos.shape != (rows,) or start_pos.dtype != torch.int64:
            raise ValueError(f"start_pos must be an int64 tensor of shape ({rows},), one position per row, got "
                             f"{_describe(start_pos)}")
        if tokens.device != device or start_pos.device != device:
            raise ValueError(f"tokens and start_pos must be on the model's device {device}, got {tokens.device} and "
                             f"{start_pos.device}")

    def step(self, tokens: torch.Tensor, start_pos: torch.Tensor, slot: "int | torch.Tensor" = 0,
             kv_len: Optional[int] = None, last_logits_only: bool = False,
             seq_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 logits (rows, seqlen, vocab_size) of `tokens` (rows, seqlen), row i's at positions
        [start_pos[i], start_pos[i] + seqlen) of KV slot slot + i, or of slot[i] when `slot` is an int64 tensor
        (rows,) of distinct slots (slower: each layer copies those slots' cached keys and values). One call serves
        a prompt or a chunk of one, several prompts' chunks, a one-token decode step of several sequences, or
        several proposed tokens to verify at once.

        Each new token sees its slot's positions up to its own; earlier calls filled those before the row's start.
        Attention reads positions [0, kv_len), which must cover every row's tokens (start_pos[i] + seqlen <=
        kv_len <= max_seq_len: the caller knows the positions, the model would have to wait for the device to
        check them); a row whose logits the caller ignores may lie beyond kv_len (its keys and values are written
        all the same). None reads the whole cache, so that no shape depends on a position (torch.compile, CUDA
        graphs). `seq_lens` (int64 (rows,), values in [1, seqlen]) makes rows ragged: row i's tokens are its first
        seq_lens[i], the rest padding whose keys and values land past them, to be overwritten before anything
        reads them. With `last_logits_only` only each row's last token (its seq_lens[i]-th) is projected: (rows, 1,
        vocab_size).
        """
        if self.rope is None or self.rope.device != self.norm.weight.device:
            raise ValueError(f"the KV caches are not set up on {self.norm.weight.device}; call setup_caches() first")
        self.check_inputs(tokens, start_pos, slot, kv_len, seq_lens)
        seqlen = tokens.shape[1]
        positions = start_pos[:, None] + self.positions[:seqlen]  # (rows, seqlen)
        # kv_len == seqlen means every row starts at 0: plain causal attention, for which sdpa needs no mask (and
        # may use the flash kernel on GPUs, which an explicit mask rules out).
        mask = None
        if kv_len != seqlen:
            key_pos = self.positions if kv_len is None else self.positions[:kv_len]
            mask = (key_pos <= positions[..., None])[:, None]  # (rows, 1, seqlen, kv_len)
        h = self.tok_embeddings(tokens)  # (rows, seqlen, dim)
        rope = self.rope[positions]  # (rows, seqlen, 2, 1, head_dim)
        for layer in self.layers:
            h = layer(h, positions, rope, mask, slot, kv_len)
        if last_logits_only and seq_lens is not None:
            h = h.gather(1, (seq_lens - 1)[:, None, None].expand(-1, 1, h.shape[-1]))
        elif last_logits_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy the keys and values of positions [0, length) of KV slot `src_slot` into slot `dst_slot`, in every
        layer (under tensor parallelism each process copies its share of the heads)."""
        slots = self.args.max_batch_size
        for name, value in (("src_slot", src_slot), ("dst_slot", dst_slot)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < slots:
                raise ValueError(f"{name} must be an int in [0, {slots}), got {value!r}")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.args.max_seq_len:
            raise ValueError(f"length must be an int in [0, max_seq_len={self.args.max_seq_len}], got {length!r}")
        if src_slot == dst_slot:
            raise ValueError(f"src_slot and dst_slot must differ, got {src_slot} for both")
        if self.rope is None:
            raise ValueError("the KV caches are not set up; call setup_caches() first")
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k[dst_slot, :length] = cache.k[src_slot, :length]
            cache.v[dst_slot, :length] = cache.v[src_slot, :length]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Meta's call: float32 logits (bsz, seqlen, vocab_size) of `tokens` (bsz, seqlen) at positions
        [start_pos, start_pos + seqlen) of KV slots [0, bsz), after what earlier calls put before start_pos (see
        `step`). Sets the caches up first if they are missing or not where the weights are."""
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
        # Malformed tokens pass through to `step`, whose checks name what is wrong with them.
        rows, seqlen = tokens.shape if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else (1, 0)
        if start_pos + seqlen > self.args.max_seq_len:
            raise ValueError(f"start_pos ({start_pos}) + seqlen ({seqlen}) must be within "
                             f"max_seq_len={self.args.max_seq_len}")
        cache, like = self.layers[0].attention.kv_cache, self.norm.weight
        starts = torch.full((rows,), start_pos, device=like.device)
        self.check_inputs(tokens, starts, 0, start_pos + seqlen)
        # `.to()` moves and casts the caches (buffers) but not the float32 rope table (a plain attribute).
        if cache is None or cache.k.dtype != like.dtype or self.rope is None or self.rope.device != like.device:
            if start_pos > 0:
                raise ValueError(f"start_pos={start_pos} needs the KV cache filled by earlier calls, but it is not "
                                 "set up on the model's device and dtype; start again at start_pos=0")
            self.setup_caches()
        return self.step(tokens, starts, kv_len=start_pos + seqlen)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
