"""The bytes of each GGUF tensor, produced in pieces small enough to stream.

A piece is a run of whole rows of the tensor: one expert's projection of a stacked expert
tensor (itself quantized in row blocks), or a row block of anything else. Calibrated modules
come from the calibration directory, already on the Q4_0 grid, and are packed losslessly;
everything else is rounded to nearest here (quant/ggml.py) or converted to the file's float
type. Every source read is checked for NaN and Inf, named by file and tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from scoutq.calibrate.job import CalibratedTensors
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.rows import read_rows
from scoutq.model.llama4 import rope_inverse_frequencies
from scoutq.pipeline.quantize import _check_finite  # one NaN/Inf check (aminmax, no copy) for both writers
from scoutq.quant import ggml
from scoutq.quant.gguf_plan import ROPE_FREQS, GgufTensor
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import PlannedModule

ROW_BLOCK_BYTES = 32 * 1024 * 1024  # fp32 bytes of one row block being quantized or converted
FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
QUANTIZE = {"q4_0": ggml.quantize_q4_0, "q8_0": ggml.quantize_q8_0, "q4_k": ggml.quantize_q4_k}


def rope_factors(checkpoint: Checkpoint) -> torch.Tensor:
    """llama.cpp's `rope_freqs`: per rotation frequency, the divisor llama3 scaling applies to it
    (1 for high frequencies, `factor` for low, interpolated between), in fp32."""
    config = checkpoint.config
    rope = config.rope
    base = rope_inverse_frequencies(config.head_dim, type(rope)(theta=rope.theta)).double()
    scaled = rope_inverse_frequencies(config.head_dim, rope).double()
    return (base / scaled).float()


def _encode(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """fp32-or-source rows [n, columns] as the tensor kind's bytes [n, row_bytes] (uint8)."""
    if kind in FLOAT_DTYPES:
        return rows.to(FLOAT_DTYPES[kind]).contiguous().view(torch.uint8)
    return QUANTIZE[kind](rows.float())


def _in_row_blocks(weight: torch.Tensor, kind: str, what: str) -> Iterator[torch.Tensor]:
    """A [out, in] weight (any strides) encoded in blocks of rows."""
    rows, columns = weight.shape
    step = max(1, ROW_BLOCK_BYTES // (4 * max(columns, 1)))
    for start in range(0, rows, step):
        # Row-major fp32 (an expert's rows are a transposed view): the quantizers' many
        # elementwise passes then read memory in order.
        block = weight[start : start + step].float().contiguous()
        _check_finite(block, what)
        yield _encode(block, kind)


class TensorData:
    """Produces each GgufTensor's bytes from the checkpoint (and the calibrated modules)."""

    def __init__(self, checkpoint: Checkpoint, calibrated: CalibratedTensors | None = None):
        self.checkpoint = checkpoint
        self.calibrated = calibrated

    def pieces(self, tensor: GgufTensor) -> Iterator[torch.Tensor]:
        """The tensor's bytes as uint8 pieces of whole rows, in order."""
        if tensor.name == ROPE_FREQS:
            yield rope_factors(self.checkpoint).view(torch.uint8)
            return
        for part in tensor.parts:
            yield from self._module(part, tensor.kind)

    def _module(self, item: PlannedModule, kind: str) -> Iterator[torch.Tensor]:
        module = item.module
        if self.calibrated is not None and item.scheme is not None and self.calibrated.has(module.name):
            yield ggml.packed_blocks(self._calibrated(item))
            return
        info = self.checkpoint.info(module.source)
        what = f"{info.file}: tensor {info.name!r}" + (f" (expert {module.expert})" if module.expert is not None else "")
        if module.expert is not None:
            # Stored input-major [in, 2*width] (gate|up) or [in, out] (down); the Linear is its transpose.
            block = read_rows(info, module.expert, module.expert + 1)[0]
            width = self.checkpoint.config.intermediate_size
            stored = {"gate": block[:, :width], "up": block[:, width:]}.get(module.proj or "", block)
            yield from _in_row_blocks(stored.t(), kind, what)
            return
        if len(info.shape) <= 1:  # norms: whole, widened to the file's type
            values = self.checkpoint.read(module.source)
            _check_finite(values, what)
            yield _encode(values.reshape(1, -1), kind)
            return
        rows, columns = info.shape
        step = max(1, ROW_BLOCK_BYTES // (4 * columns))
        for start in range(0, rows, step):
            yield from _in_row_blocks(read_rows(info, start, min(start + step, rows)), kind, what)

    def _calibrated(self, item: PlannedModule) -> PackedWeight:
        name = item.module.name
        assert self.calibrated is not None and item.scheme is not None
        suffixes = ("weight_packed", "weight_scale", "weight_shape")
        state = {suffix: tensor for suffix, (_, tensor) in
                 zip(suffixes, self.calibrated.tensors(name, [f"{name}.{s}" for s in suffixes]), strict=True)}
        return PackedWeight.from_state(state, item.scheme)
