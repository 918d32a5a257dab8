"""scoutq's own int4 CPU kernel, the torch op `torch.ops.scoutq.int4_matmul` (int4_avx512.cpp).

Why: PyTorch's `_weight_int4pack_mm_for_cpu` is compute-bound at one token on the CPUs measured
here (field-notes F). This kernel widens nibbles to bf16 in registers with one logic instruction
and multiplies with the AVX-512 BF16 dot-product instruction, so a one-token matmul runs at a
much larger fraction of memory bandwidth (`scoutq bench kernels` prints both).

The op is `int4_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? zero_scales,
int group_size) -> Tensor`: x [tokens, in] bf16, packed [out, in / 2] uint8 (`pack_int4`),
scales and zero_scales (z * s) [out, in / group_size] fp32; it returns y [tokens, out] fp32.
A fake (meta) implementation is registered too, so torch.compile can trace through it.

It is built on first use by `torch.utils.cpp_extension.load` (the C++ compiler `$CXX`, else
`c++`, and ninja) into `$XDG_CACHE_HOME/scoutq/torch_extensions/<python>_<torch>/` (else
`~/.cache/...`), one folder per Python and torch version because the library is tied to
torch's ABI; ninja rebuilds it when the source or flags change, and a lock file in the folder
serialises concurrent first builds. Where the CPU lacks AVX-512 BF16, no compiler or ninja is
found, the build fails, or `SCOUTQ_NATIVE=0`, `library()` returns None with the reason in
`status()`, and the cpu backend uses PyTorch's kernel instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scoutq.quant.packed import PackedWeight

SOURCE = Path(__file__).with_name("int4_avx512.cpp")
NAME = "scoutq_int4_avx512"
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
STALE_LOCK_SECONDS = 600
CHUNK = 64  # inputs per packed run (int4_avx512.cpp); in_features and group size must be multiples

def build_directory(name: str = NAME) -> Path:
    """Where an extension is built: the user's cache, one folder per Python and torch version."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    abi = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return Path(base) / "scoutq" / "torch_extensions" / abi / name


def _cpu_problem() -> str | None:
    """Why this CPU cannot run the kernel, or None. Asked before building: a build takes tens of
    seconds, and code compiled for AVX-512 should not be loaded where it cannot run."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU with AVX-512 BF16 (this is {platform.machine()})"
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if has_bf16 is None:
        return f"torch {torch.__version__} cannot report AVX-512 BF16 support"
    if not has_bf16():
        return "this CPU lacks AVX-512 BF16"
    return None


def _toolchain_problem() -> str | None:
    """Why the extension cannot be built here, or None."""
    compiler = os.environ.get("CXX") or "c++"  # what torch.utils.cpp_extension runs
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler}; set CXX)"
    if shutil.which("ninja") is None:
        return "ninja not found on PATH (torch's extension builder needs it: pip install ninja)"
    return None


def load_extension(name: str, source: Path, cflags: list[str]) -> None:
    """Build (or reuse) the C++ source `source` as torch extension `name` and load it, which
    registers its ops; raises if the build fails."""
    from torch.utils import cpp_extension  # imports setuptools: only when a build is wanted

    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    # torch's build lock outlives a build killed outright (SIGKILL, out of memory) and would make
    # every later load wait forever; no build of one such file takes ten minutes.
    with contextlib.suppress(FileNotFoundError):
        lock = directory / "lock"
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=LDFLAGS,
                       build_directory=str(directory), is_python_module=False, verbose=False)


@functools.cache
def build() -> torch._ops.OpOverloadPacket:
    """Build (or reuse) and load the extension and return its op, whatever the CPU; raises if the
    build fails. The op itself refuses to run on a CPU without AVX-512 BF16. Cached: a torch
    op namespace can be registered only once per process."""
    load_extension(NAME, SOURCE, CFLAGS)

    @torch.library.register_fake("scoutq::int4_matmul")
    def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_scales: torch.Tensor | None,
          group_size: int) -> torch.Tensor:
        torch._check(x.dim() == 2 and packed.dim() == 2, lambda: "x and packed must be 2-D")
        return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)

    return torch.ops.scoutq.int4_matmul


def _failure(error: Exception) -> str:
    """A one-line reason from a failed build: the compiler's first error line, else the last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    errors = [line for line in lines if "error:" in line]
    return (errors[0] if errors else lines[-1])[:300]


class ExtensionOp:
    """A torch op from a C++ extension built on first use, or why it is not available: switched
    off by SCOUTQ_NATIVE=0, a known problem (CPU, toolchain), or a build that failed (named by
    its first error line). Loaded once per process: an op namespace registers only once."""

    def __init__(self, name: str, what: str, problem: Callable[[], str | None],
                 build: Callable[[], torch._ops.OpOverloadPacket], ready: str):
        self.name, self.what, self.problem, self.build, self.ready = name, what, problem, build, ready

    @functools.cached_property
    def _loaded(self) -> tuple[torch._ops.OpOverloadPacket | None, str]:
        if os.environ.get("SCOUTQ_NATIVE", "1") == "0":
            return None, "disabled by SCOUTQ_NATIVE=0"
        problem = self.problem()
        if problem is not None:
            return None, problem
        try:
            return self.build(), self.ready
        except Exception as failed:  # noqa: BLE001 - any failure to build or load means the fallback, not a crash
            return None, f"could not build or load the {self.what} in {build_directory(self.name)}: {_failure(failed)}"

    def op(self) -> torch._ops.OpOverloadPacket | None:
        return self._loaded[0]

    def status(self) -> str:
        """`ready` when the op is in use, else the reason it is not."""
        return self._loaded[1]


_NATIVE = ExtensionOp(NAME, "kernel", lambda: _cpu_problem() or _toolchain_problem(), build, "avx512-bf16")
library = _NATIVE.op  # the op `torch.ops.scoutq.int4_matmul`, or None (see `status()` for why)
status = _NATIVE.status  # 'avx512-bf16' when the kernel is in use, else the reason


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
    """A PackedWeight repacked for scoutq::int4_matmul; call it on activations [..., in]."""

    def __init__(self, weight: PackedWeight):
        op = library()
        if op is None or not supports(weight):
            raise ValueError(f"the native int4 kernel cannot run this weight ({status()})")
        self._op = op
        self.out_features, self.in_features = weight.shape
        self.group = weight.scheme.group_size or self.in_features
        self.packed = pack_int4(weight.unpacked())
        self.scales = weight.scale.float().contiguous()
        self.zero_scales = None
        if weight.zero_point is not None:
            self.zero_scales = (weight.zero_point.float() * self.scales).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = self._op(rows, self.packed, self.scales, self.zero_scales, self.group)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
