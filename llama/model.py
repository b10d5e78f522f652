"""The Llama 3.x transformer: plain PyTorch, one class per part, nothing about files, processes or kernels.

Each attention layer computes q, k and v with one matmul (`wqkv`: Meta's wq, wk and wv stacked by rows) and each
feed-forward layer its gate and up projections with another (`w13`: w1 and w3 stacked); the checkpoint loader
stacks Meta's tensors this way. Tensor parallelism (`llama.parallel`), int8 and CPU kernels (`llama.kernels`) and
compiled decoding (`llama.compile`) are applied to a built model from outside.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.args import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel computes x * rsqrt(mean(x²) + eps) in one pass instead of five
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: Optional[torch.device] = None) -> torch.Tensor:
    """Rotation speed (radians per position) of each pair of a head's dims, float32, shape (head_dim // 2,)."""
    exponents = torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim
    freqs = 1.0 / (args.rope_theta ** exponents)
    if not args.use_scaled_rope:
        return freqs
    # Llama 3.1 scaling: slow rotations (wavelength above the original context) are slowed down by the
    # factor, fast ones (wavelength below context / 4) are kept, and the band between blends the two.
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    blend = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - blend) * freqs / args.rope_scaling_factor + blend * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scaling_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


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

    x: (bsz, seqlen, n_heads, head_dim); table: rows of `rope_table`, (1 or bsz, seqlen, 2, 1, head_dim): the
    same positions for every row, or each row's own.
    """
    cos, signed_sin = table.unbind(2)  # each (1 or bsz, seqlen, 1, head_dim)
    values = x.float()
    swapped = values.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # x[2i + 1] at 2i and x[2i] at 2i + 1
    return (values * cos + swapped * signed_sin).type_as(x)


class Attention(nn.Module):
    """Grouped-query self-attention with a KV cache for incremental decoding."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # Heads this module computes: all of them, until tensor parallelism gives it its share.
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.max_batch_size, self.max_seq_len = args.max_batch_size, args.max_seq_len
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Plain attributes, not buffers: they stay out of state_dict() and are allocated on the activations'
        # device and dtype, so the model can be built on meta and filled afterwards.
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def _ensure_cache(self, like: torch.Tensor, start_pos: int) -> None:
        cache = self.cache_k
        if cache is not None and cache.device == like.device and cache.dtype == like.dtype:
            return
        if start_pos > 0:
            raise ValueError(
                f"start_pos={start_pos} needs the KV cache filled by earlier calls, but it is empty or on another "
                f"device/dtype; start again at start_pos=0"
            )
        shape = (self.max_batch_size, self.max_seq_len, self.n_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, device=like.device, dtype=like.dtype)
        self.cache_v = torch.zeros(shape, device=like.device, dtype=like.dtype)

    def _cached_keys_values(
        self, k: torch.Tensor, v: torch.Tensor, slot: int, start_pos: int | torch.Tensor, kv_len: Optional[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values and return the cached ones the new positions may see.

        An int `start_pos` puts row i's tokens at positions [start_pos, start_pos + seqlen) of KV slot slot + i and
        returns those slots' positions [0, start_pos + seqlen). A (bsz,) tensor (one new token per row) puts row
        i's token at position start_pos[i] of slot i and returns slots [0, bsz), positions [0, kv_len), or all of
        them when kv_len is None, so that no shape depends on a position (for torch.compile and CUDA graphs).
        """
        bsz, seqlen = k.shape[:2]
        if isinstance(start_pos, torch.Tensor):
            if self.cache_k is None:
                raise ValueError("a decode step needs a KV cache filled by earlier calls; start with a prompt")
            rows = torch.arange(bsz, device=k.device)
            self.cache_k[:bsz].index_put_((rows, start_pos), k[:, 0])
            self.cache_v[:bsz].index_put_((rows, start_pos), v[:, 0])
            end = self.max_seq_len if kv_len is None else kv_len
            return self.cache_k[:bsz, :end], self.cache_v[:bsz, :end]
        self._ensure_cache(k, start_pos)
        end = start_pos + seqlen
        self.cache_k[slot : slot + bsz, start_pos:end] = k
        self.cache_v[slot : slot + bsz, start_pos:end] = v
        return self.cache_k[slot : slot + bsz, :end], self.cache_v[slot : slot + bsz, :end]  # (bsz, end, kv, hd)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor,
        rope: torch.Tensor,
        mask: Optional[torch.Tensor],
        slot: int = 0,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """`mask` says which cached positions each new one sees; None means causal from an empty cache. See
        `_cached_keys_values` for where `start_pos`, `slot` and `kv_len` put and read the keys and values."""
        bsz, seqlen, _ = x.shape
        kv_width = self.n_kv_heads * self.head_dim
        qk, v = self.wqkv(x).split([(self.n_heads + self.n_kv_heads) * self.head_dim, kv_width], dim=-1)
        # Queries and keys rotate alike: one rope over both heads' kinds, then the split.
        qk = apply_rope(qk.view(bsz, seqlen, self.n_heads + self.n_kv_heads, self.head_dim), rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        keys, values = self._cached_keys_values(k, v, slot, start_pos, kv_len)
        if seqlen == 1:
            out = self._decode_attention(q, keys, values, mask)
        else:
            # sdpa wants heads before positions; enable_gqa lets each kv head serve its group of query heads.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                is_causal=mask is None, enable_gqa=True,
            ).transpose(1, 2)  # (bsz, seqlen, n_heads, head_dim)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Attention of one new token per row over the cached positions (all of them, or those `visible`: a mask
        of shape (bsz, 1, 1, end) or one that broadcasts to it), as two batched matmuls.

        The query heads that share a kv head are stacked against it, so K/V are never repeated; on CPU this is
        several times faster than sdpa for a single query position.
        """
        bsz = q.shape[0]
        group = self.n_heads // self.n_kv_heads
        q = q.view(bsz, self.n_kv_heads, group, self.head_dim)  # query head h uses kv head h // group
        # keys @ q^T, then transposed: the cache slice is then the matmul's row-major operand, which torch's CPU
        # kernels read as it is; q @ keys^T, the same numbers, is 2-5x slower in bfloat16 on the CPU.
        scores = torch.matmul(keys.permute(0, 2, 1, 3), q.transpose(-1, -2))  # (bsz, n_kv, end, group)
        scores = scores.transpose(-1, -2) * self.head_dim**-0.5  # (bsz, n_kv, group, end)
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

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | torch.Tensor,
        rope: torch.Tensor,
        mask: Optional[torch.Tensor],
        slot: int = 0,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, slot, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 3 decoder.

    Parameters are created on the current default device and dtype (build under `torch.device("meta")` to
    allocate nothing), to be filled by a checkpoint loader (`llama.checkpoint.load`).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # float32 cos/sin table and position indices, built on first use on the activations' device (plain
        # attributes for the same reason as the KV caches).
        self._rope: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None

    def check_inputs(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> None:
        """Raise ValueError unless `tokens` (bsz, seqlen) at `start_pos` of KV slots [slot, slot + bsz) fit the
        model; build the rope table."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor of shape (bsz, seqlen), got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        bsz, seqlen = tokens.shape
        if not 1 <= bsz <= self.args.max_batch_size:
            raise ValueError(f"batch size {bsz} must be between 1 and max_batch_size={self.args.max_batch_size}")
        if not 0 <= slot <= self.args.max_batch_size - bsz:
            raise ValueError(f"slot ({slot}) + batch size ({bsz}) must be within max_batch_size="
                             f"{self.args.max_batch_size}, slot >= 0")
        if seqlen < 1 or start_pos < 0 or start_pos + seqlen > self.args.max_seq_len:
            raise ValueError(f"start_pos ({start_pos}) + seqlen ({seqlen}) must be within "
                             f"max_seq_len={self.args.max_seq_len}, seqlen >= 1")
        device = self.norm.weight.device
        if tokens.device != device:
            raise ValueError(f"tokens are on {tokens.device} but the model is on {device}")
        if self._rope is None or self._rope.device != device:
            self._rope = rope_table(self.args, device)
            self._positions = torch.arange(self.args.max_seq_len, device=device)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, *, slot: int = 0, last_logits_only: bool = False
    ) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab_size) for `tokens` (bsz, seqlen) placed at `start_pos`.

        Row i uses KV slot slot + i, whose earlier positions come from previous calls. With `last_logits_only`
        only the last position is projected: shape (bsz, 1, vocab_size). A (bsz,) tensor `start_pos` is a decode
        step with each row at its own position (see `decode_step`), attending over the longest row's positions.
        """
        if isinstance(start_pos, torch.Tensor):
            self.check_inputs(tokens, 0)
            return self.decode_step(tokens, start_pos, kv_len=int(start_pos.max()) + 1)
        self.check_inputs(tokens, start_pos, slot)
        seqlen = tokens.shape[1]
        # New token i sits at position start_pos + i and sees every cached position up to its own. From an empty
        # cache that is plain causal attention: sdpa's causal mode needs no mask, and on GPUs it allows the flash
        # kernel, which an explicit mask rules out.
        mask = None
        if seqlen > 1 and start_pos > 0:
            key_pos = self._positions[: start_pos + seqlen]
            mask = key_pos[None, :] <= key_pos[start_pos:, None]  # (seqlen, start_pos + seqlen)
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        rope = self._rope[None, start_pos : start_pos + seqlen]  # (1, seqlen, 2, 1, head_dim)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask, slot)
        if last_logits_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        """Logits (bsz, 1, vocab_size) of `tokens` (bsz, 1), row i placed at position positions[i] of KV slot i.

        Each row sees its slot's positions up to its own, which earlier calls filled. Attention reads positions
        [0, kv_len), which must cover every row's position; with kv_len None it reads the whole cache, so that no
        shape depends on a position and `torch.compile` and CUDA graphs can replay one step everywhere.
        """
        key_pos = self._positions if kv_len is None else self._positions[:kv_len]
        visible = key_pos[None, :] <= positions[:, None]  # (bsz, kv_len)
        rope = self._rope[positions][:, None]  # (bsz, 1, 2, 1, head_dim)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, positions, rope, visible[:, None, None, :], kv_len=kv_len)
        return self.output(self.norm(h)).float()
