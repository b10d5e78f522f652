"""Writing checkpoint folders: atomically (a temporary folder renamed into place), and in Meta's layout.

`write_meta_checkpoint` is the one writer of Meta checkpoints: the random-weight, resharding and HF-import commands
only say what each shard holds. `output_dir` is also what the HF export writes its folder with.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import torch


@contextlib.contextmanager
def output_dir(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `dst` that is renamed to `dst` only once everything in it was written.

    A non-empty `dst` is refused unless `overwrite`, so an interrupted or failed write never leaves a folder
    that looks like a valid checkpoint.
    """
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # mkdtemp (and some writers) make owner-only files; give the result the usual permissions of the umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [partial, *partial.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    partial.rename(dst)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checklist(folder: Path) -> None:
    """`checklist.chk`: the MD5 of every other file in `folder`, in md5sum's format, as Meta ships it."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{_md5(p)}  {p.name}\n" for p in files))


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    # torch.save writes a tensor's whole storage; make sure that is only this tensor's elements.
    tensor = tensor.contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def write_meta_checkpoint(
    dst: Union[str, Path],
    params: Union[dict, Path],
    n_shards: int,
    shard_tensors: Callable[[int], Iterable[tuple[str, torch.Tensor]]],
    tokenizer: Optional[Path],
    overwrite: bool = False,
    no_tokenizer_warning: Optional[str] = None,
) -> Path:
    """Write a Meta checkpoint folder `dst` atomically (see `output_dir`) and return its path.

    `shard_tensors(rank)` yields (key, tensor) for `consolidated.{rank:02d}.pth`, in state-dict order; each
    tensor is compacted as it comes and each shard saved before the next is asked for, so at most one shard is
    in memory (views of larger tensors are fine). `params` is a params.json dict, or a params.json file copied
    as it is. `tokenizer` is copied to tokenizer.model; when it is None, `no_tokenizer_warning` (if given) is
    warned, on behalf of the writer's caller.
    """
    dst = Path(dst)
    with output_dir(dst, overwrite) as partial:
        for rank in range(n_shards):
            shard = {key: _compact(tensor) for key, tensor in shard_tensors(rank)}
            torch.save(shard, partial / f"consolidated.{rank:02d}.pth")
            del shard
        if isinstance(params, dict):
            (partial / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        else:  # bytes as they are, so that a rewritten checkpoint keeps its own params.json
            shutil.copyfile(params, partial / "params.json")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, partial / "tokenizer.model")
        elif no_tokenizer_warning is not None:
            warnings.warn(no_tokenizer_warning, stacklevel=3)
        write_checklist(partial)
    return dst
