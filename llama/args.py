"""`ModelArgs`: the shape of a Llama 3.x model (the fields of Meta's `params.json`) and the sizes it runs with."""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

# Llama 3.1 rope scaling constants (Meta's reference uses these for every 3.1+ model).
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192

# params.json of the published shapes, for random checkpoints and benchmarks. `tiny` is small enough for tests
# (hidden dim 224: multiplier 1.3, rounded up to a multiple of 32).
PRESETS: dict[str, dict] = {
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256,
             "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
             "use_scaled_rope": True},
    "1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0,
           "use_scaled_rope": True},
    "3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
           "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0,
           "use_scaled_rope": True},
    "8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
           "use_scaled_rope": True},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
            "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
            "use_scaled_rope": True},
}


MAX_SIZE = 2**53  # ffn_hidden_dim's formula goes through a float, which holds integers exactly up to here
_INT_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_batch_size",
               "max_seq_len")
_NUMBER_FIELDS = ("norm_eps", "rope_theta", "rope_scaling_factor", "ffn_dim_multiplier")
# params.json's "quantization" of a checkpoint whose weights are stored in GGUF's blocks (llama.block_quant), which
# `from_gguf` writes; not Meta's layout.
GGUF_BLOCKS = "gguf_blocks"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a size


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ModelArgs:
    """Model shape and runtime sizes; the first fields mirror Meta's `params.json`. The defaults are Meta's (the
    8B shape, 32 slots), with Llama 3's vocabulary."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means one kv head per query head
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Meta's reference always scales by 8; HF's Llama 3.2 1B/3B configs say 32, so a checkpoint
    # converted from HF records its own factor here.
    rope_scaling_factor: float = 8.0
    quantization: Optional[str] = None  # None: Meta's layout; GGUF_BLOCKS: weights stored as GGUF blocks
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= MAX_SIZE:
                raise ValueError(f"ModelArgs.{name} must be a positive integer (at most 2**53), got {value!r}")
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            if not (name == "ffn_dim_multiplier" and value is None) and not (_is_number(value) and value > 0):
                allowed = " or null" if name == "ffn_dim_multiplier" else ""
                raise ValueError(f"ModelArgs.{name} must be a positive finite number{allowed}, got {value!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"ModelArgs.use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        if self.quantization not in (None, GGUF_BLOCKS):
            raise ValueError(f"ModelArgs.quantization must be null or {GGUF_BLOCKS!r}, got {self.quantization!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelArgs.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = dim / n_heads must be even for rotary embeddings, got {self.head_dim}")
        try:
            hidden = self.ffn_hidden_dim
        except OverflowError:  # a huge multiplier makes the float formula infinite
            hidden = math.inf
        if not 0 < hidden < math.inf:
            raise ValueError(f"ModelArgs.ffn_dim_multiplier ({self.ffn_dim_multiplier}) gives dim {self.dim} an FFN "
                             f"hidden size of {hidden}; it must be positive and finite")

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
