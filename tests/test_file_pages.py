"""A memory-mapped weight's file pages are let go chunk by chunk while it is quantized (or its stored blocks are
packed), so that loading int8 or int4 weights never holds a whole layer's file pages beside its quantized copy;
anonymous memory is never touched.

Resident pages are read from /proc/self/smaps (the kernel's count for the file's mapping), independently of the
code under test. Linux only.
"""

import dataclasses
import sys

import pytest
import torch

from llama import blocks_cpu, int8_cpu
from llama.block_quant import Q8Blocks, unpack_q4
from llama.file_pages import file_mapped, row_chunks
from llama.int4 import Int4Linear, Q8BlockLinear, quantize_q4
from llama.kernels import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file pages are released on Linux only")

ROWS, COLS = 8192, 2048  # 32 MiB of bfloat16
# The kernel maps a file's pages in folios of up to 2 MiB, so residency is counted to within that.
FOLIO = 2 << 20


def resident_bytes(tensor: torch.Tensor) -> int:
    """Resident bytes of the mapping that holds `tensor`'s data, from /proc/self/smaps."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(bound, 16) for bound in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.fixture
def mapped_weight(tmp_path) -> torch.Tensor:
    """A (ROWS, COLS) bfloat16 weight memory-mapped from a file of its own, none of it read yet."""
    torch.save({"w": torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)).bfloat16()},
               tmp_path / "w.pth")
    return torch.load(tmp_path / "w.pth", mmap=True, weights_only=True)["w"]


def test_a_checkpoint_weight_is_file_mapped_and_a_tensor_in_memory_is_not(mapped_weight):
    assert file_mapped(mapped_weight)
    assert file_mapped(mapped_weight[ROWS // 2 :])
    assert not file_mapped(mapped_weight.clone())


def test_reading_a_mapped_weight_by_row_chunks_keeps_about_one_chunk_resident(mapped_weight):
    chunk_bytes = 1024 * COLS * 2  # 4 MiB: an eighth of the weight
    peak = 0
    for _, chunk in row_chunks(mapped_weight, 1024):
        chunk.float().sum()  # read it, as a quantizer does
        peak = max(peak, resident_bytes(mapped_weight))
    assert chunk_bytes <= peak <= chunk_bytes + 2 * FOLIO
    assert resident_bytes(mapped_weight) <= FOLIO


def test_row_chunks_of_a_tensor_in_memory_leave_its_data_alone(mapped_weight):
    weight = mapped_weight.clone()
    for _, chunk in row_chunks(weight, 1024):
        chunk.float().sum()
    assert torch.equal(weight, mapped_weight)


@pytest.mark.parametrize("make", [quantize_int8, Int8Linear, Int4Linear], ids=["quantize_int8", "Int8Linear",
                                                                               "Int4Linear"])
def test_quantizing_a_mapped_weight_gives_the_same_layer_and_leaves_its_pages_released(mapped_weight, make):
    def tensors(result):
        if isinstance(result, tuple):
            return list(result)
        return [t for t in [*result.buffers(), *result.parameters()] if not t.is_meta]

    expected = tensors(make(mapped_weight.clone()))
    got = tensors(make(mapped_weight))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert resident_bytes(mapped_weight) <= FOLIO  # of the 32 MiB read


@pytest.mark.skipif(not int8_cpu.available(), reason="the int8 CPU kernel needs x86 AVX-512 VNNI")
def test_int8_packs_in_chunks_exactly_what_packing_the_whole_weight_gives(mapped_weight):
    values, scale = quantize_int8(mapped_weight.clone())
    layer = Int8Linear(mapped_weight[: ROWS - 40])  # rows that do not fill the last packed group of 64
    assert torch.equal(layer.packed, int8_cpu.pack(values[: ROWS - 40]))
    assert torch.equal(layer.scale, scale[: ROWS - 40].float())


@pytest.mark.parametrize("kind", ["Q4", "Q8"])
def test_a_layer_of_mapped_blocks_is_the_layer_of_the_blocks_and_leaves_their_pages_released(tmp_path, kind):
    """A checkpoint of GGUF blocks: each block layer packs its stored blocks slice by slice, letting each slice's
    pages go, so that the file's pages are not held beside the packed copy."""
    if kind == "Q8" and not blocks_cpu.available():
        pytest.skip("without the blocks kernel Q8 blocks are dequantized, not packed")
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))
    q4 = quantize_q4(weight)
    blocks = q4 if kind == "Q4" else Q8Blocks(unpack_q4(q4.values).to(torch.int8) - 8, q4.scales)
    fields = {field.name: getattr(blocks, field.name) for field in dataclasses.fields(blocks)}
    torch.save(fields, tmp_path / "blocks.pth")
    mapped = type(blocks)(**torch.load(tmp_path / "blocks.pth", mmap=True, weights_only=True))
    make = Int4Linear.from_blocks if kind == "Q4" else Q8BlockLinear.from_blocks
    expected, got = make(blocks, torch.bfloat16), make(mapped, torch.bfloat16)
    assert torch.equal(got.packed, expected.packed)
    assert resident_bytes(mapped.values) <= 2 * FOLIO
