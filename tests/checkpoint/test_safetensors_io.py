"""`StreamingWriter` and `read_header` agree with the reference safetensors implementation.

A file streamed in pieces reads back through `safetensors.safe_open` exactly like the same
tensors saved by `safetensors.torch.save_file` (names, dtypes, shapes, values, metadata);
misuse (out of order, wrong dtype, too many or too few bytes) raises; and `read_header`
round-trips what was written, down to each tensor's byte range.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scoutq.checkpoint.safetensors_io import DTYPE_NAMES, StreamingWriter, header_bytes, read_header

Entry = tuple[str, str, tuple[int, ...]]


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor of each common dtype, in file order, with awkward (non-power-of-two) shapes."""
    generator = torch.Generator().manual_seed(0)
    return {
        "experts.gate_up_proj": torch.randn(3, 5, 6, generator=generator).to(torch.bfloat16),
        "scale": torch.randn(7, 3, generator=generator),
        "zero_point": torch.randint(-(2**31), 2**31 - 1, (11,), generator=generator, dtype=torch.int32),
        "packed": torch.randint(-(2**62), 2**62, (2, 3), generator=generator, dtype=torch.int64),
        "scalar": torch.tensor(1.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "bias": torch.randn(9, generator=generator).to(torch.bfloat16),
    }


def entries_of(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    return [(name, DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]


def pieces(tensor: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Row-major pieces of at most `rows` leading-dimension rows (a 0-d tensor is one piece)."""
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        return [tensor]
    return list(torch.split(tensor, rows, dim=0))


def stream(path: Path, tensors: dict[str, torch.Tensor], rows: int = 2, metadata: dict[str, str] | None = None) -> Path:
    writer = StreamingWriter(path, entries_of(tensors), metadata)
    for name, tensor in tensors.items():
        for piece in pieces(tensor, rows):
            writer.write(name, piece)
    writer.close()
    return path


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


@pytest.mark.parametrize("rows", [1, 2, 1000], ids=["row-by-row", "two-rows", "whole"])
def test_streamed_file_reads_back_like_save_file(tmp_path: Path, rows: int) -> None:
    tensors = sample_tensors()
    streamed = stream(tmp_path / "streamed.safetensors", tensors, rows)
    reference = tmp_path / "reference.safetensors"
    save_file(tensors, reference, metadata={"format": "pt"})

    ours, our_metadata = read_all(streamed)
    theirs, their_metadata = read_all(reference)
    assert our_metadata == their_metadata == {"format": "pt"}
    assert set(ours) == set(theirs) == set(tensors)
    for name, tensor in tensors.items():
        assert ours[name].dtype == theirs[name].dtype == tensor.dtype, name
        assert ours[name].shape == theirs[name].shape == tensor.shape, name
        assert torch.equal(ours[name], theirs[name]), name
        assert torch.equal(ours[name], tensor), name
    # Same payload: the files differ only in header layout (save_file orders by dtype alignment).
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert streamed.stat().st_size - 8 - struct.unpack("<Q", streamed.read_bytes()[:8])[0] == data


def test_custom_metadata_round_trips(tmp_path: Path) -> None:
    path = stream(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)}, metadata={"format": "pt", "producer": "scoutq"})
    assert read_all(path)[1] == {"format": "pt", "producer": "scoutq"}
    assert read_header(path)[1] == {"format": "pt", "producer": "scoutq"}


def test_read_header_round_trips(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = stream(tmp_path / "streamed.safetensors", tensors)
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert list(infos) == list(tensors)  # declared order is file order

    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert header_len % 8 == 0  # the data buffer starts 8-byte aligned
    assert raw[:8 + header_len] == header_bytes(entries_of(tensors))
    data = raw[8 + header_len :]
    offset = 0
    for name, tensor in tensors.items():
        info = infos[name]
        assert (info.name, info.file) == (name, path)
        assert (info.dtype, info.shape) == (DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))
        assert info.begin == offset, name  # tightly packed, in declared order
        assert info.nbytes == tensor.numel() * tensor.element_size() == info.end - info.begin
        assert info.numel == math.prod(tensor.shape) == tensor.numel()
        stored = data[info.begin : info.end]
        assert stored == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
        offset = info.end
    assert offset == len(data)


def test_read_header_reads_save_file_output(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "reference.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert {name: (info.dtype, info.shape) for name, info in infos.items()} == {
        name: (dtype, shape) for name, dtype, shape in entries_of(tensors)
    }


# -- misuse ----------------------------------------------------------------------------------


def two_tensor_writer(path: Path) -> StreamingWriter:
    return StreamingWriter(path, [("a", "F32", (4, 2)), ("b", "I64", (3,))])


def test_out_of_order_raises(tmp_path: Path) -> None:
    writer = two_tensor_writer(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="'b' written out of declared order"):
        writer.write("b", torch.zeros(3, dtype=torch.int64))
    writer.write("a", torch.zeros(2, 2))  # half of a
    with pytest.raises(ValueError, match="out of declared order"):
        writer.write("b", torch.zeros(3, dtype=torch.int64))  # a is not finished yet
    writer.write("a", torch.zeros(2, 2))
    writer.write("b", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of declared order"):
        writer.write("a", torch.zeros(1, 2))  # a is complete: going back is not allowed
    writer.close()


def test_undeclared_tensor_raises(tmp_path: Path) -> None:
    writer = two_tensor_writer(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="'c'"):
        writer.write("c", torch.zeros(1))
    writer.abort()


def test_wrong_dtype_raises(tmp_path: Path) -> None:
    writer = two_tensor_writer(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="declared F32"):
        writer.write("a", torch.zeros(4, 2, dtype=torch.bfloat16))
    writer.abort()


def test_too_many_bytes_raises(tmp_path: Path) -> None:
    writer = two_tensor_writer(tmp_path / "x.safetensors")
    writer.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="more bytes"):
        writer.write("a", torch.zeros(2, 2))
    writer.abort()


@pytest.mark.parametrize("written", [0, 1, 2], ids=["nothing", "first-only", "first-and-part-of-second"])
def test_short_write_raises_on_close(tmp_path: Path, written: int) -> None:
    writer = two_tensor_writer(tmp_path / "x.safetensors")
    if written >= 1:
        writer.write("a", torch.zeros(4, 2))
    if written >= 2:
        writer.write("b", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="not completely written"):
        writer.close()


def test_zero_size_tensor_in_any_position(tmp_path: Path) -> None:
    """A declared empty tensor is 'written' by an empty piece wherever it sits in the order."""
    tensors = {
        "first": torch.zeros(0, dtype=torch.float32),
        "middle_a": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "middle": torch.zeros(0, 5, dtype=torch.bfloat16),
        "last_but_one": torch.ones(2, dtype=torch.int64),
        "last": torch.zeros(3, 0, dtype=torch.float32),
    }
    path = stream(tmp_path / "empty.safetensors", tensors)
    back, _ = read_all(path)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
