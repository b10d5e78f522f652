import socket

import pytest
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_parallel() -> None:
    """A one-process gloo group with fairscale model parallelism of size 1 (what Transformer needs)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
