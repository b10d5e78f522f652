"""The Llama 3.x transformer, laid out so Meta's `consolidated.NN.pth` shards load as they are.

Tensor parallelism follows Meta's layout with fairscale's layers: the embedding is split over the
vocabulary, wq/wk/wv/w1/w3/output are column-parallel (weights split along dim 0), wo/w2 are
row-parallel (split along dim 1) and the norms are replicated. The model-parallel group must be
initialised (fairscale's `initialize_model_parallel`) before a `Transformer` is built.
"""

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from fairscale.nn.model_parallel.utils import VocabUtility
from torch import nn

# Llama 3.1 rope scaling constants (Meta's reference uses these for every 3.1+ model).
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192
# Above this many rows the int8 kernel is slower than dequantizing the weight for an ordinary matmul.
INT8_KERNEL_MAX_ROWS = 64


@dataclass
class ModelArgs:
    """Model shape and runtime sizes; the first fields mirror Meta's `params.json`."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None  # None means one kv head per query head
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Meta's reference always scales by 8; HF's Llama 3.2 1B/3B configs say 32, so a checkpoint
    # converted from HF records its own factor here.
    rope_scaling_factor: float = 8.0
    max_batch_size: int = 4
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be positive or None, got {self.ffn_dim_multiplier!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"ModelArgs.use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelArgs.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = dim / n_heads must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a `params.json` dict; unknown keys are ignored with a warning.

        `overrides` (e.g. max_seq_len, max_batch_size) take precedence over `params` and must be field names.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        bad_overrides = sorted(set(overrides) - fields)
        if bad_overrides:
            raise ValueError(f"unknown ModelArgs override(s) {bad_overrides}; valid names: {sorted(fields)}")
        unknown = sorted(set(params) - fields)
        if unknown:
            warnings.warn(f"ignoring unknown params.json key(s) {unknown}", stacklevel=2)
        kwargs = {k: v for k, v in params.items() if k in fields}
        kwargs.update(overrides)
        missing = [name for name in ("dim", "n_layers", "n_heads", "vocab_size") if name not in kwargs]
        if missing:
            raise ValueError(f"params is missing required key(s) {missing}")
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * -(-hidden // self.multiple_of)

    def check_model_parallel_size(self, model_parallel_size: int) -> None:
        """Raise ValueError unless the model splits evenly into `model_parallel_size` shards.

        With more shards than kv heads, each kv head is replicated on model_parallel_size / n_kv_heads
        neighbouring shards (the ones whose query heads use it), so that ratio must be a whole number.
        """
        mp = model_parallel_size
        if isinstance(mp, bool) or not isinstance(mp, int) or mp <= 0:
            raise ValueError(f"model_parallel_size must be a positive integer, got {mp!r}")
        for name, size in (("n_heads", self.n_heads), ("ffn hidden dim", self.ffn_hidden_dim),
                           ("vocab_size", self.vocab_size)):
            if size % mp != 0:
                raise ValueError(f"model_parallel_size {mp} does not divide {name} ({size}); "
                                 "it must divide n_heads, the ffn hidden dim and vocab_size")
        if self.n_kv_heads % mp != 0 and mp % self.n_kv_heads != 0:
            raise ValueError(f"model_parallel_size {mp} and n_kv_heads ({self.n_kv_heads}) must divide one another")

    def n_local_kv_heads(self, model_parallel_size: int) -> int:
        """kv heads held by each of `model_parallel_size` shards: one replicated head when they outnumber the heads."""
        return max(1, self.n_kv_heads // model_parallel_size)


# fairscale's layers allocate weights with the legacy `torch.Tensor(rows, cols)` constructor, which
# ignores `with torch.device("meta")` and the default dtype, and with model parallelism > 1 they also
# build the full unsharded "master weight" on every rank to initialise it. So a 405B model cannot be
# built on the meta device through their constructors. These subclasses keep fairscale's classes but
# allocate only this rank's shard with `torch.empty`, which follows the device context and default
# dtype; weights are left uninitialised, as they always come from a checkpoint. Their forward passes
# are inference-only: fairscale's collectives, without the autograd wrappers around them, and with the
# option of int8 weights (see `quantize_int8`).


def _matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], packed: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x @ weight.T, where an int8 weight comes with per-output-channel scales, and `packed` is `pack_for_cpu(weight)`."""
    if packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
    if scale is None:
        return F.linear(x, weight)
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and rows < INT8_KERNEL_MAX_ROWS:  # torch's int8 weight-only kernel: fast for decoding
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), weight, scale)
        return out.view(*x.shape[:-1], -1)
    # Long prompts are compute-bound: dequantize once and use the regular (e.g. AMX) matmul.
    return F.linear(x, weight.to(x.dtype)) * scale


class EmptyColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """Bias-free column-parallel linear: the weight (out_features, in_features) is split along dim 0."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.sharded = get_model_parallel_world_size() > 1
        self.output_size_per_partition = out_features // get_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features))
        self.register_parameter("bias", None)
        self.register_buffer("scale", None, persistent=False)
        self.packed: Optional[torch.Tensor] = None  # see pack_for_cpu; not state, so not moved by .to()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _matmul(x, self.weight, self.scale, self.packed)
        return gather_from_model_parallel_region(out) if self.gather_output and self.sharded else out


class EmptyRowParallelLinear(fs_layers.RowParallelLinear):
    """Bias-free row-parallel linear on already-split input: the weight is split along dim 1."""

    def __init__(self, in_features: int, out_features: int) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = True
        self.sharded = get_model_parallel_world_size() > 1
        self.input_size_per_partition = in_features // get_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition))
        self.register_parameter("bias", None)
        self.register_buffer("scale", None, persistent=False)
        self.packed: Optional[torch.Tensor] = None  # see pack_for_cpu; not state, so not moved by .to()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _matmul(x, self.weight, self.scale, self.packed)
        return reduce_from_model_parallel_region(out) if self.sharded else out


def can_pack_for_cpu(weight: torch.Tensor) -> bool:
    """Whether `pack_for_cpu` applies: a bfloat16 weight on the CPU, with oneDNN available."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def pack_for_cpu(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The weight in oneDNN's blocked layout, which makes CPU bfloat16 matmuls with few rows (decoding) much faster.

    None where this torch build or processor cannot pack it; the plain weight is then used.
    """
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def fuse_linears(linears: list[nn.Module]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One weight (and int8 scales) for linears that read the same input: their weights stacked along dim 0.

    Each layer's weight becomes a view of the stacked one, so parameters, state_dict and memory use stay as they
    were, while one larger matmul replaces several small ones.
    """
    with torch.no_grad():
        fused = torch.cat([m.weight for m in linears])
    scale = torch.cat([m.scale for m in linears]) if linears[0].scale is not None else None
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        if scale is not None:
            m.scale = scale[start : start + rows]
        start += rows
    return fused, scale


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is one of the model's (parallel) linear layers, the ones int8 quantization applies to."""
    return isinstance(module, (EmptyColumnParallelLinear, EmptyRowParallelLinear))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one scale per output channel (in the weight's dtype): weight ≈ values * scale[:, None].

    Used on each process's own shard, so it works under model parallelism. Activations keep the model's dtype.
    """
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / 127  # (out_features,)
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    rows_per_chunk = max(1, (1 << 22) // weight.shape[1])  # float32 temporaries of ~16 MB, not of the whole matrix
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        values[rows] = torch.round(weight[rows].float() / scale[rows, None])
    return values, scale.to(weight.dtype)


class EmptyVocabParallelEmbedding(fs_layers.VocabParallelEmbedding):
    """Embedding split over the vocabulary (dim 0); this rank holds rows [vocab_start_index, vocab_end_index)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, get_model_parallel_rank(), get_model_parallel_world_size()
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.sharded = get_model_parallel_world_size() > 1
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return F.embedding(tokens, self.weight)
        # Tokens outside this rank's rows contribute zeros; the all-reduce adds the rank that holds each row.
        local = tokens - self.vocab_start_index
        held = (local >= 0) & (local < self.num_embeddings_per_partition)
        rows = F.embedding(local.clamp(0, self.num_embeddings_per_partition - 1), self.weight)
        return reduce_from_model_parallel_region(torch.where(held[..., None], rows, 0))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; normalises in float32 and casts back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
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
    """cos/sin of every position's rotation angles, float32, shape (max_seq_len, head_dim // 2, 2)."""
    positions = torch.arange(args.max_seq_len, device=device).float()
    angles = torch.outer(positions, rope_frequencies(args, device))  # (max_seq_len, head_dim // 2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by its angle (Meta's interleaved layout).

    x: (bsz, seqlen, n_heads, head_dim); table: (seqlen, head_dim // 2, 2) from `rope_table`.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, n_heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]  # (1, seqlen, 1, head_dim // 2)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Grouped-query self-attention over this rank's heads, with a KV cache for incremental decoding."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        mp = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.n_local_kv_heads(mp)
        self.head_dim = args.head_dim
        self.max_batch_size = args.max_batch_size
        self.max_seq_len = args.max_seq_len
        self.wq = EmptyColumnParallelLinear(args.dim, args.n_heads * args.head_dim, gather_output=False)
        kv_rows = mp * self.n_local_kv_heads * args.head_dim  # n_kv_heads * head_dim unless heads are replicated
        self.wk = EmptyColumnParallelLinear(args.dim, kv_rows, gather_output=False)
        self.wv = EmptyColumnParallelLinear(args.dim, kv_rows, gather_output=False)
        self.wo = EmptyRowParallelLinear(args.n_heads * args.head_dim, args.dim)
        self.wqkv: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # see fuse_weights
        # Plain attributes, not buffers: they stay out of state_dict() and are (re)allocated on the
        # activations' device and dtype, so the model can be built on meta and moved afterwards.
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
        shape = (self.max_batch_size, self.max_seq_len, self.n_local_kv_heads, self.head_dim)
        self.cache_k = torch.zeros(shape, device=like.device, dtype=like.dtype)
        self.cache_v = torch.zeros(shape, device=like.device, dtype=like.dtype)

    def forward(
        self, x: torch.Tensor, start_pos: int | torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """`start_pos` is an int, or for one new token a (1,)-shaped tensor: then the whole cache is attended to,
        `mask` (max_seq_len,) says which positions are filled, and no shape depends on the position (for
        torch.compile and CUDA graphs)."""
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            kv_width = self.n_local_kv_heads * self.head_dim
            q, k, v = _matmul(x, *self.wqkv).split([self.n_local_heads * self.head_dim, kv_width, kv_width], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)

        if isinstance(start_pos, torch.Tensor):
            self.cache_k[:bsz].index_copy_(1, start_pos, k)
            self.cache_v[:bsz].index_copy_(1, start_pos, v)
            keys, values = self.cache_k[:bsz], self.cache_v[:bsz]  # (bsz, max_seq_len, n_local_kv_heads, head_dim)
        else:
            self._ensure_cache(k, start_pos)
            end = start_pos + seqlen
            self.cache_k[:bsz, start_pos:end] = k
            self.cache_v[:bsz, start_pos:end] = v
            keys = self.cache_k[:bsz, :end]  # (bsz, end, n_local_kv_heads, head_dim)
            values = self.cache_v[:bsz, :end]

        if seqlen == 1:
            out = self._decode_attention(q, keys, values, mask)
        else:
            # sdpa wants heads before positions; enable_gqa lets each kv head serve its group of query heads.
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
                is_causal=mask is None, enable_gqa=True,
            ).transpose(1, 2)  # (bsz, seqlen, n_local_heads, head_dim)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _decode_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Attention of one new token per row over the cached positions (all of them, or those `visible`), as two
        batched matmuls.

        The query heads that share a kv head are stacked against it, so K/V are never repeated; on CPU this is
        several times faster than sdpa for a single query position.
        """
        bsz = q.shape[0]
        group = self.n_local_heads // self.n_local_kv_heads
        q = q.view(bsz, self.n_local_kv_heads, group, self.head_dim)  # query head h uses kv head h // group
        scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * self.head_dim**-0.5  # (bsz, n_kv, group, end)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.matmul(probs, values.transpose(1, 2))  # (bsz, n_kv, group, head_dim)
        return out.reshape(bsz, 1, self.n_local_heads, self.head_dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), with the hidden dim split across ranks."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = EmptyColumnParallelLinear(args.dim, hidden, gather_output=False)
        self.w2 = EmptyRowParallelLinear(hidden, args.dim)
        self.w3 = EmptyColumnParallelLinear(args.dim, hidden, gather_output=False)
        self.w13: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # see fuse_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = _matmul(x, *self.w13).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
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
        self, x: torch.Tensor, start_pos: int | torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 3 decoder; `state_dict()` holds exactly the keys of one of Meta's shard files.

    Parameters are created uninitialised on the current default device and dtype (build under
    `torch.device("meta")` to allocate nothing), to be filled by `load_state_dict(..., assign=True)`.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        args.check_model_parallel_size(get_model_parallel_world_size())
        self.args = args
        self.tok_embeddings = EmptyVocabParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = EmptyColumnParallelLinear(args.dim, args.vocab_size, gather_output=True)
        # float32 cos/sin table, built lazily on the weights' device (a plain attribute for the same
        # reason as the KV caches).
        self._rope: Optional[torch.Tensor] = None
        self._compiled_step: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
        self._positions: Optional[torch.Tensor] = None  # arange(max_seq_len), the compiled step's position inputs
        self._static_caches: list[torch.Tensor] = []  # the caches the compiled step was told stay in place

    def fuse_weights(self) -> None:
        """Compute q/k/v and w1/w3 each with one matmul over their weights stacked at load time (no extra memory).

        On a GPU, where a small-batch decode step is a long chain of short kernels, this saves launches and lets
        each matmul stream a larger weight. The parameters and `state_dict()` keep Meta's layout.
        """
        for layer in self.layers:
            attention, feed_forward = layer.attention, layer.feed_forward
            attention.wqkv = fuse_linears([attention.wq, attention.wk, attention.wv])
            feed_forward.w13 = fuse_linears([feed_forward.w1, feed_forward.w3])

    def compile_decoding(self) -> None:
        """From now on decode single tokens with a `torch.compile`d step; prompts still run eagerly.

        No shape in the step depends on the position (new keys/values go in with `index_copy_` and attention reads
        the whole cache under a mask), so one compilation serves every position; each batch size compiles once,
        on its first decode step (slow: seconds to minutes). On CUDA the step is replayed as a CUDA graph, which
        removes the per-kernel launch cost that dominates small-batch decoding. On the CPU inductor freezes the
        weights into its own bfloat16 GEMM layout, which reads them faster than oneDNN's; that layout replaces the
        oneDNN-packed copy, but prompts then read the original weights, so memory holds both.
        """
        device = self.output.weight.device
        if device.type == "cuda":
            options: dict[str, Any] = {"mode": "reduce-overhead"}
        elif device.type == "cpu":
            options = {"options": {"max_autotune": True}}
            for module in self.modules():
                if is_linear(module):
                    module.packed = None
        else:
            raise ValueError(f"compiled decoding supports CUDA and CPU devices, not {device.type}")
        # Collectives under model parallelism may need graph breaks; a single shard must compile whole.
        compiled = torch.compile(self._decode_step, dynamic=False, fullgraph=get_model_parallel_world_size() == 1,
                                 **options)
        if device.type == "cpu":

            def compiled_with_frozen_weights(tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                # Inductor reads `freezing` before a compile's own options apply, so it is set around each call.
                with torch._inductor.config.patch(freezing=True):
                    return compiled(tokens, pos)

            self._compiled_step = compiled_with_frozen_weights
        else:
            self._compiled_step = compiled
        self._positions = torch.arange(self.args.max_seq_len, device=device)

    def _decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (bsz, 1, vocab_size) of `tokens` (bsz, 1) placed at position `pos` (a (1,) tensor)."""
        rope = self._rope[pos]  # (1, head_dim // 2, 2)
        visible = self._positions <= pos  # (max_seq_len,): cached positions up to and including the new one
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, pos, rope, visible)
        return self.output(self.norm(h)).float()

    def _use_compiled_step(self, seqlen: int, start_pos: int, last_logits_only: bool, device: torch.device) -> bool:
        """Whether this call can go through the compiled step: one new token after a prompt that filled the cache."""
        if self._compiled_step is None or seqlen != 1 or start_pos == 0 or not last_logits_only:
            return False
        caches = [c for layer in self.layers for c in (layer.attention.cache_k, layer.attention.cache_v)]
        if any(c is None or c.device != device for c in caches):
            return False
        if any(a is not b for a, b in zip(caches, self._static_caches)) or len(caches) != len(self._static_caches):
            # Tell dynamo the caches keep their addresses, so CUDA graphs may update them in place.
            for cache in caches:
                torch._dynamo.mark_static_address(cache)
            self._static_caches = caches
        return True

    def reset_cache(self) -> None:
        """Free the KV caches and the rope table; they are rebuilt by the next forward at start_pos 0."""
        self._rope = None
        self._static_caches = []
        for layer in self.layers:
            layer.attention.cache_k = None
            layer.attention.cache_v = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, last_logits_only: bool = False) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab_size) for `tokens` (bsz, seqlen) placed at `start_pos`.

        Earlier positions come from the KV cache filled by previous calls. With `last_logits_only`
        only the last position is projected: shape (bsz, 1, vocab_size).
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor of shape (bsz, seqlen), got {tokens.dtype} {tuple(tokens.shape)}")
        bsz, seqlen = tokens.shape
        args = self.args
        if not 1 <= bsz <= args.max_batch_size:
            raise ValueError(f"batch size {bsz} must be between 1 and max_batch_size={args.max_batch_size}")
        if seqlen < 1 or start_pos < 0 or start_pos + seqlen > args.max_seq_len:
            raise ValueError(
                f"start_pos ({start_pos}) + seqlen ({seqlen}) must be within max_seq_len={args.max_seq_len}, seqlen >= 1"
            )
        device = self.tok_embeddings.weight.device
        if tokens.device != device:
            raise ValueError(f"tokens are on {tokens.device} but the model is on {device}")

        if self._rope is None or self._rope.device != device:
            self._rope = rope_table(args, device)
        if self._use_compiled_step(seqlen, start_pos, last_logits_only, device):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # earlier steps' outputs are no longer needed
            # Fresh contiguous tokens: a column sliced from a longer buffer has strides that vary from call to
            # call, and each new stride would compile again. The output is copied: a CUDA graph's next replay
            # overwrites the one it returned.
            tokens = tokens.clone(memory_format=torch.contiguous_format)
            return self._compiled_step(tokens, self._positions[start_pos : start_pos + 1]).clone()
        rope = self._rope[start_pos : start_pos + seqlen]

        # New token i sits at position start_pos + i and sees every cached position up to its own. From an empty
        # cache that is plain causal attention: sdpa's causal mode needs no mask, and on GPUs it allows the flash
        # kernel, which an explicit mask rules out.
        mask = None
        if seqlen > 1 and start_pos > 0:
            key_pos = torch.arange(start_pos + seqlen, device=device)
            query_pos = torch.arange(start_pos, start_pos + seqlen, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]  # (seqlen, start_pos + seqlen)

        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask)
        if last_logits_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
