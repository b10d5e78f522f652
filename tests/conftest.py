"""Shared fixtures: the real Llama 3 tokenizer (from the `llama-models` package), tiny random checkpoints, an
independent HF transformers model holding the same weights, and small helpers the test files share."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama.chat_format import ChatFormat
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the slowest end-to-end runs (scripts, torchrun, benchmarks); CI runs "
                                       "them, a developer may skip them with -m 'not slow'")


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Three prompts of different lengths (a batch of them has rows that start decoding at different steps)."""
    return ["The capital of France is", "Hello", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"]


@pytest.fixture(scope="session")
def small_params() -> dict:
    """params.json of a small grouped-query model (vocabulary 512) for comparisons with transformers: head_dim 32
    with rope_theta 500000 puts rope pairs in all three Llama 3.1 bands (wavelength < 2048, 2048..8192, > 8192)."""
    return {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
            "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}


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
def tokens(tokenizer) -> torch.Tensor:
    """Two short prompts of equal length, (2, seqlen): what the quantization tests compare logits on."""
    prompts = ["Quantized weights should", "keep the logits close to the original ones"]
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    length = min(len(t) for t in encoded)
    return torch.tensor([t[:length] for t in encoded])


@pytest.fixture(scope="session")
def chat_format(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="session")
def meta_tokenizer(tokenizer_path):
    """Meta's own tokenizer from `llama-models`: an independent implementation over the same file."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(K)`: the `tiny` preset with seed 0, written as K shards (the same weights for every K)."""
    from llama.checkpoint.random_weights import write_random_checkpoint

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

    from llama.args import ModelArgs
    from llama.checkpoint.hf import meta_to_hf_state_dict
    from llama.checkpoint.hf_config import hf_config_dict
    from llama.checkpoint.load import load_shard, read_params

    ckpt = tiny_checkpoint(1)
    args = ModelArgs.from_params(read_params(ckpt))
    state_dict = {k: v.float() for k, v in load_shard(ckpt / "consolidated.00.pth").items()}
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(args))).eval()
    model.load_state_dict(meta_to_hf_state_dict(state_dict, args), strict=True)
    return model


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 and block kernels see it: each block of 32 values (zero-padded) rounded to int8 steps of
    max|block| / 127."""
    cols = x.shape[-1]
    blocks = torch.nn.functional.pad(x.float(), (0, -cols % 32)).unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    # The kernel's float32 arithmetic; amax.new_tensor: `127 / amax` would multiply by a rounded reciprocal.
    inverse = torch.where(amax > 0, amax.new_tensor(127.0) / amax, 0)
    steps = torch.round(blocks * inverse)
    return (steps.double() * (amax.double() / 127)).flatten(-2)[..., :cols]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far `a` is from the reference `b`, relative to the reference's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="session")
def rel_err():
    """`rel_err(a, b)`: max |a - b| / max |b|."""
    return relative_error


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for process groups and torchrun rendezvous)."""
    return unused_port()


class ServerProcess:
    """`python -m llama.serve` (or torchrun -m llama.serve) run from this checkout on a free port of 127.0.0.1;
    `torchrun` is torchrun's own flags (with nproc > 1 and none given: --standalone --nproc_per_node NPROC)."""

    def __init__(self, log_path: Path, ckpt_dir: Path, *flags: str, nproc: int = 1,
                 torchrun: list[str] | None = None):
        self.port = unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if torchrun is None and nproc > 1:
            torchrun = ["--standalone", f"--nproc_per_node={nproc}"]
        launcher = [sys.executable, *(["-m", "torch.distributed.run", *torchrun] if torchrun else [])]
        command = [*launcher, "-m", "llama.serve", "--ckpt_dir", str(ckpt_dir), "--port", str(self.port), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The process ids of the workers torchrun started (on this node)."""
        pid = self.process.pid
        return sorted(int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        """Return once GET /health answers 200; fail with the server's output if it exits or takes too long."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not start within {timeout} s:\n{self.log()[-5000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL if it does not come)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """`start_server(ckpt_dir, *flags, nproc=1, torchrun=None)`: a running server (ServerProcess), stopped after the
    module."""
    servers = []

    def start(ckpt_dir: Path, *flags: str, nproc: int = 1, torchrun: list[str] | None = None) -> ServerProcess:
        log = tmp_path_factory.mktemp("serve") / "server.log"
        servers.append(ServerProcess(log, ckpt_dir, *flags, nproc=nproc, torchrun=torchrun))
        return servers[-1].wait_ready()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def model_from_meta():
    """`model_from_meta(params, state_dict, **overrides)`: a one-process `Transformer` holding a full Meta state
    dict (Meta's keys), its wq/wk/wv and w1/w3 stacked the way the checkpoint loader stacks them."""
    from llama.args import ModelArgs
    from llama.checkpoint.load import meta_sources
    from llama.model import Transformer

    def build(params: dict, state_dict: dict, **overrides) -> Transformer:
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_params(params, **overrides))
        stacked = {name: torch.cat([state_dict[key] for key in meta_sources(name)]) for name in model.state_dict()}
        model.load_state_dict(stacked, strict=True, assign=True)
        return model

    return build


class ForcedTokens:
    """A stand-in for the engine's step function whose calls (counted from 0) must pick given tokens: `forced[i]`
    is the token of call i, for every row or only for `row`. Calls without one return the real logits."""

    def __init__(self, step, forced: dict[int, int] | list[int], row: int | None = None):
        self.step, self.row, self.calls = step, row, 0
        self.forced = dict(enumerate(forced)) if isinstance(forced, list) else forced

    def __call__(self, tokens, start_pos, *args, **kwargs):
        logits = self.step(tokens, start_pos, *args, **kwargs)
        token = self.forced.get(self.calls)
        if token is not None:
            logits[slice(None) if self.row is None else self.row, -1, token] = 1e9
        self.calls += 1
        return logits


@pytest.fixture
def force_tokens(monkeypatch):
    """`force_tokens(llama, forced, row=None)`: from now on `llama` generates the `forced` tokens (see ForcedTokens);
    returns the stand-in, whose `calls` counts step calls. It forces one token per call, so prompt lookup (which
    may keep several tokens of a call) is turned off meanwhile."""

    def force(llama, forced: dict[int, int] | list[int], row: int | None = None) -> ForcedTokens:
        stand_in = ForcedTokens(llama.engine.forward, forced, row)
        monkeypatch.setattr(llama.engine, "forward", stand_in)
        monkeypatch.setattr(llama.engine, "lookup", None)
        return stand_in

    return force
