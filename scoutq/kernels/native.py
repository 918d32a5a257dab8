"""scoutq's own int4 CPU kernel (int4_avx512.c), compiled on first use and called through ctypes.

PyTorch's `_weight_int4pack_mm_for_cpu` is compute-bound at one token on the CPUs measured
here (field-notes F). The C kernel widens nibbles to bf16 in registers with one logic
instruction and multiplies with the AVX-512 BF16 dot-product instruction, so a one-token matmul runs at a
much larger fraction of memory bandwidth (`scoutq bench kernels` prints both).

The shared library is built with the system C compiler (`$CC`, else `cc`) into
`$XDG_CACHE_HOME/scoutq/native/` under a hash of the source and flags (temporary name, then
rename, so concurrent first uses are safe). Where the CPU lacks AVX-512 BF16, no compiler is
found, or `SCOUTQ_NATIVE=0`, `library()` returns None with the reason in `status()`, and the
cpu backend uses PyTorch's kernel instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from scoutq.quant.packed import PackedWeight

SOURCE = Path(__file__).with_name("int4_avx512.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
CHUNK = 64  # inputs per packed run (int4_avx512.c); in_features and group size must be multiples

_status = "not loaded yet"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scoutq" / "native"


def _build(compiler: str) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"int4_avx512-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (see `status()` for why)."""
    global _status
    if os.environ.get("SCOUTQ_NATIVE", "1") == "0":
        _status = "disabled by SCOUTQ_NATIVE=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _status = f"needs an x86-64 CPU with AVX-512 BF16 (this is {platform.machine()})"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _status = "no C compiler found (set CC)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except subprocess.CalledProcessError as failed:
        _status = f"{compiler} failed: {(failed.stderr or '').strip().splitlines()[-1:] or failed.returncode}"
        return None
    except OSError as failed:
        _status = f"could not build or load the kernel: {failed}"
        return None
    if not lib.scoutq_int4_supported():
        _status = "this CPU lacks AVX-512 BF16"
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.scoutq_int4_matmul.argtypes = [pointer] * 6 + [i64] * 4 + [ctypes.c_int]
    lib.scoutq_int4_matmul.restype = None
    _status = "avx512-bf16"
    return lib


def status() -> str:
    """What `library()` found: 'avx512-bf16' when the kernel is in use, else the reason."""
    library()
    return _status


def supports(weight: PackedWeight) -> bool:
    """Whether the kernel can run this weight (int4, groups of a multiple of 64)."""
    group = weight.scheme.group_size or weight.shape[1]
    return (weight.scheme.bits == 4 and weight.shape[1] % CHUNK == 0 and group % CHUNK == 0
            and weight.shape[1] % group == 0)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] in [-8, 7] -> the kernel's uint8 layout [out, in / 2]: in each run
    of 64 inputs, byte j holds code j + 8 in its low nibble and code 32 + j + 8 in its high."""
    out_features, in_features = q.shape
    unsigned = (q.to(torch.int16) + 8).to(torch.uint8).view(out_features, in_features // CHUNK, 2, CHUNK // 2)
    return (unsigned[:, :, 0] | (unsigned[:, :, 1] << 4)).reshape(out_features, in_features // 2).contiguous()


class NativeInt4Matmul:
    """A PackedWeight repacked for int4_avx512.c; call it on activations [..., in]."""

    def __init__(self, weight: PackedWeight):
        lib = library()
        if lib is None or not supports(weight):
            raise ValueError(f"the native int4 kernel cannot run this weight ({status()})")
        self._lib = lib
        self.out_features, self.in_features = weight.shape
        self.group = weight.scheme.group_size or self.in_features
        self.packed = pack_int4(weight.unpacked())
        self.scales = weight.scale.float().contiguous()
        self.zero_scales = None
        if weight.zero_point is not None:
            self.zero_scales = (weight.zero_point.float() * self.scales).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        tokens = rows.shape[0]
        y = torch.empty(tokens, self.out_features, dtype=torch.float32)
        # The kernel's per-group offset correction needs the sums of the activations it reads.
        sums = rows.float().view(tokens, -1, self.group).sum(-1).contiguous()
        self._lib.scoutq_int4_matmul(
            self.packed.data_ptr(), self.scales.data_ptr(),
            None if self.zero_scales is None else self.zero_scales.data_ptr(),
            rows.data_ptr(), sums.data_ptr(), y.data_ptr(),
            tokens, self.out_features, self.in_features, self.group, torch.get_num_threads())
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
