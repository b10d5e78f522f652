"""`python -m llama.checkpoint reshard` rewrites a checkpoint for another shard count, bit for bit."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint.reshard import reshard_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _tensors(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(p, weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))]


def _assert_identical(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert len(left) == len(right)
    for x, y in zip(left, right):
        assert list(x) == list(y)
        assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(("m", "k"), [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4)])
def test_m_to_k_to_m_is_bit_identical(tiny_checkpoint, tmp_path, m, k):
    there = reshard_checkpoint(tiny_checkpoint(m), tmp_path / "there", k)
    back = reshard_checkpoint(there, tmp_path / "back", m)
    assert len(_tensors(there)) == k
    _assert_identical(back, tiny_checkpoint(m))
    # Shards written for k processes are what a checkpoint written for k directly holds.
    _assert_identical(there, tiny_checkpoint(k))


def test_output_is_a_complete_meta_folder_with_a_valid_checklist(tiny_checkpoint, tmp_path):
    dst = reshard_checkpoint(tiny_checkpoint(1), tmp_path / "mp2", 2)
    assert sorted(p.name for p in dst.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model",
    ]  # fmt: skip
    assert (dst / "params.json").read_bytes() == (tiny_checkpoint(1) / "params.json").read_bytes()
    checked = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=dst, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 4


def test_refuses_a_non_empty_destination_unless_overwrite(tiny_checkpoint, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        reshard_checkpoint(tiny_checkpoint(1), dst, 2)
    assert (dst / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="notes.txt"):  # --overwrite replaces only an earlier output
        reshard_checkpoint(tiny_checkpoint(1), dst, 2, overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine"
    (dst / "notes.txt").rename(dst / "params.json")  # now it looks like an earlier output
    reshard_checkpoint(tiny_checkpoint(1), dst, 2, overwrite=True)
    assert not (dst / "notes.txt").exists() and len(_tensors(dst)) == 2


def test_a_failed_write_leaves_nothing_that_looks_like_a_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        reshard_checkpoint(tiny_checkpoint(1), tmp_path / "dst", 2)
    assert list(tmp_path.iterdir()) == []


def test_incompatible_shard_count_lists_the_valid_ones(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"valid process counts .* are \[1, 2, 4\]"):
        reshard_checkpoint(tiny_checkpoint(2), tmp_path / "dst", 3)
    assert not (tmp_path / "dst").exists()


def test_command_line(tiny_checkpoint, tmp_path):
    run = [sys.executable, "-m", "llama.checkpoint", "reshard"]
    done = subprocess.run([*run, str(tiny_checkpoint(2)), str(tmp_path / "mp1"), "--model_parallel_size", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _assert_identical(tmp_path / "mp1", tiny_checkpoint(1))
    helped = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "MODEL_PARALLEL_SIZE" in helped.stdout + helped.stderr


def test_output_has_ordinary_permissions(tiny_checkpoint, tmp_path):
    dst = reshard_checkpoint(tiny_checkpoint(1), tmp_path / "dst", 2)
    assert dst.stat().st_mode & 0o055 == 0o055  # group and others may read and enter, as with mkdir
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in dst.iterdir())


def test_command_line_errors_are_one_line(tiny_checkpoint, tmp_path):
    done = subprocess.run([sys.executable, "-m", "llama.checkpoint", "reshard", str(tmp_path / "nowhere"),
                           str(tmp_path / "dst"), "--model_parallel_size", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: checkpoint folder not found")
    assert "Traceback" not in done.stderr
