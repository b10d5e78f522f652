"""Writing checkpoint folders: atomically (a temporary folder renamed into place), never over anything but an earlier
output, and in Meta's layout.

`write_meta_checkpoint` is the one writer of Meta checkpoints: the random-weight, resharding and HF-import commands
only say what each shard holds. `output_dir` is also what the HF export writes its folder with.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import torch

from llama.bpe import SIDECAR_NAME

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from Linux's fcntl.h and fs.h
# What the checkpoint commands write into an output folder (and `original/` of an HF folder). --overwrite replaces
# only a folder that holds nothing else, so that it cannot delete a user's own files.
_OUTPUT_NAMES = re.compile(r"consolidated\.\d+\.pth|params\.json|tokenizer\.model|checklist\.chk|config\.json|"
                           r".*\.safetensors|model\.safetensors\.index\.json|tokenizer.*\.json|"
                           r"special_tokens_map\.json|generation_config\.json")


def _foreign_files(folder: Path, top: bool = True) -> list[str]:
    """The entries of `folder` that no checkpoint command writes."""
    found = []
    for entry in sorted(folder.iterdir()):
        if top and entry.name == "original" and entry.is_dir() and not entry.is_symlink():
            found += [f"original/{name}" for name in _foreign_files(entry, top=False)]
        elif not (entry.is_file() and _OUTPUT_NAMES.fullmatch(entry.name)):
            found.append(entry.name)
    return found


def check_destination(dst: Union[str, Path], overwrite: bool = False, sources: Iterable[Union[str, Path]] = ()) -> Path:
    """The folder `dst` resolves to, once sure that writing there can cost nothing but an earlier output.

    Refused, before any work: the current folder or a folder holding it; a source or a folder holding one (a new
    folder inside a source is fine: it changes none of its files); anything but a folder; a non-empty folder unless
    `overwrite`, and even then one holding files that no checkpoint command writes. Paths are compared resolved, so a
    symlinked `dst` means the folder it points to.
    """
    try:
        target = Path(dst).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise ValueError(f"cannot resolve the destination {dst}: {error}") from None
    if Path.cwd().resolve().is_relative_to(target):
        raise ValueError(f"destination {dst} is the current folder or holds it (choose a new folder for the output)")
    for source in (Path(path).resolve() for path in sources):
        if target == source:
            raise ValueError(f"destination {dst} is the source {source} (choose another folder for the output)")
        if source.is_relative_to(target):
            raise ValueError(f"destination {dst} holds the source {source} (choose a folder outside it)")
    if not target.exists():
        return target
    if not target.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder; choose another destination")
    if any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass --overwrite")
    foreign = _foreign_files(target)
    if foreign:
        raise FileExistsError(f"{dst} holds files that no checkpoint command writes ({', '.join(foreign[:5])}), so "
                              "--overwrite does not replace it; move them away or choose another destination")
    return target


@contextlib.contextmanager
def output_dir(dst: Union[str, Path], overwrite: bool = False,
               sources: Iterable[Union[str, Path]] = ()) -> Iterator[Path]:
    """A temporary folder beside `dst` that takes the place of `dst` only once everything in it was written.

    `dst` is checked first (see `check_destination`; for a symlink, the output goes where it points), and what
    interrupted runs for it left beside it is removed. An earlier output at `dst` is replaced in one step where the
    system can swap two folders (Linux), else by two renames, and deleted only then: a run killed at any moment
    leaves a complete folder (the old or the new one; with two renames, the old one as `.NAME.old-*`), plus
    leftovers named `.NAME.partial-*` or `.NAME.old-*`, which the next run for `dst` removes.
    """
    sources = list(sources)
    target = check_destination(dst, overwrite, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield partial
        _ordinary_permissions(partial)
        check_destination(dst, overwrite, sources)  # again: files may have appeared there while this one was written
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _put_in_place(partial, target)


def _remove_leftovers(target: Path) -> None:
    """Remove the `.NAME.partial-*` and `.NAME.old-*` folders that killed runs for `target` left beside it."""
    ours = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-[a-z0-9_]+")  # mkdtemp's suffixes
    for entry in sorted(target.parent.iterdir()):
        if ours.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            print(f"note: removing {entry}, left by an interrupted run", file=sys.stderr)
            shutil.rmtree(entry)


def _ordinary_permissions(folder: Path) -> None:
    # mkdtemp (and some writers) make owner-only files; give the result the usual permissions of the umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _put_in_place(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`; an earlier output there is set aside and deleted after."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    if _exchange(new, target):
        new.rename(old)  # `new` now holds the earlier output; rename() may replace the empty folder `old`
    else:
        target.rename(old)
        new.rename(target)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2); False where the system or the file system cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checklist(folder: Path) -> None:
    """`checklist.chk`: the MD5 of every other file in `folder` and its subfolders, in md5sum's format, as Meta
    ships it (`md5sum -c checklist.chk` in `folder` checks them)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{_md5(p)}  {p.relative_to(folder).as_posix()}\n" for p in files))


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
    sources: Iterable[Union[str, Path]] = (),
) -> Path:
    """Write a Meta checkpoint folder `dst` atomically (see `output_dir`) and return its path.

    `shard_tensors(rank)` yields (key, tensor) for `consolidated.{rank:02d}.pth`, in state-dict order; each
    tensor is compacted as it comes and each shard saved before the next is asked for, so at most one shard is
    in memory (views of larger tensors are fine). `params` is a params.json dict, or a params.json file copied
    as it is. `tokenizer` is copied to tokenizer.model; when it is None, `no_tokenizer_warning` (if given) is
    warned, on behalf of the writer's caller. `sources`: the folders read from, which `dst` must stay clear of.
    A tokenizer sidecar (llama.bpe's SIDECAR_NAME) beside `tokenizer` is copied along with it.
    """
    dst = Path(dst)
    with output_dir(dst, overwrite, sources) as partial:
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
        if tokenizer is not None and Path(tokenizer).with_name(SIDECAR_NAME).is_file():
            shutil.copyfile(Path(tokenizer).with_name(SIDECAR_NAME), partial / SIDECAR_NAME)
        write_checklist(partial)
    return dst
