"""Verify a quantized output: every byte against the manifest, every tensor against the config.

`scoutq quantize` writes shards, the index, config.json (with `quantization_config`), copied
tokenizer files and, last, `scoutq-manifest.json` holding the sha256 of every other file.
`verify_output` checks, in this order, and stops at the first problem with one line naming
the file, the tensor and what is wrong:

1. the manifest parses; every file it lists exists and hashes to the recorded sha256, and no
   file in the directory is missing from it (hashing goes last: missing and extra files are
   reported before gigabytes are read);
2. config.json parses and declares compressed-tensors `pack-quantized`, status `compressed`,
   with weight-only int4/int8 groups;
3. every tensor config.json implies is present with the right dtype and shape, quantized or
   not as `quantization_config` says (ignore list first, then the groups' targets; `re:`
   targets are `re.match`ed against checkpoint module names, a plain target is an exact name),
   routed experts as per-expert 2-D keys, `weight_shape` holding [out, in], and nothing else;
4. every quantized module unpacks to its [out, in] shape and its scales are finite and
   non-zero. (Unpacked values and zero points need no range check: a b-bit field always
   decodes into [qmin, qmax].)

Tensors are read with positioned reads (`read_rows`), one module at a time, and packed
weights in row blocks, so memory stays bounded whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scoutq.checkpoint.config import TextConfig
from scoutq.checkpoint.hashing import file_sha256
from scoutq.checkpoint.layout import (
    MULTIMODAL,
    TEXT_ONLY,
    Layout,
    Role,
    detect_layout,
    expected_text_shapes,
    expected_vision_shapes,
)
from scoutq.checkpoint.manifest import MANIFEST_NAME
from scoutq.checkpoint.reader import INDEX_NAME, SINGLE_NAME, read_index, require_directory
from scoutq.checkpoint.rows import read_rows
from scoutq.checkpoint.safetensors_io import TensorInfo, read_header
from scoutq.errors import CheckpointError, ConfigError, ScoutqError
from scoutq.quant.ct_schema import (
    QuantGroup,
    group_for,
    parse_quantization_config,
    read_quantized_config,
    target_matches,
)
from scoutq.quant.packed import PackedWeight, packed_shapes

ProgressHook = Callable[[int, int], None]
"""Called as hook(bytes just hashed, total bytes to hash); first with 0 to announce the total."""

BLOCK_BYTES = 32 * 1024 * 1024  # packed rows unpacked at a time
SOURCE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class VerifyReport:
    directory: str
    files: int  # files hashed against the manifest
    tensors: int  # tensors checked for name, dtype and shape
    quantized_modules: int  # modules unpacked and checked
    bytes_hashed: int


@dataclass(frozen=True)
class QuantModule:
    name: str
    group: QuantGroup
    shape: tuple[int, int]  # [out, in]


@dataclass(frozen=True)
class Expected:
    dtype: str
    shape: tuple[int, ...]
    why: str  # what implies the tensor, for the error line


def verify_output(dst: str | Path, on_progress: ProgressHook | None = None) -> VerifyReport:
    """Check a quantized output directory; raise ScoutqError at the first problem."""
    dst = require_directory(dst, "a quantized output directory")

    manifest = _read_manifest(dst)
    files, bytes_hashed = check_files(dst, manifest, on_progress)

    config_json, config, qconfig = read_quantized_config(dst)
    groups, ignore = parse_quantization_config(dst / "config.json", qconfig)

    tensors = read_tensors(dst)
    layout = _layout(config_json, tensors)
    expected, modules = expected_tensors(dst / "config.json", config_json, config, layout, groups, ignore)
    check_tensors(dst, tensors, expected, modules)
    recorded = manifest.get("quantized_modules")
    if isinstance(recorded, int) and recorded != len(modules):
        raise ScoutqError(f"{dst / MANIFEST_NAME}: records {recorded} quantized modules but config.json's "
                          f"quantization_config quantizes {len(modules)}")
    for module in modules:
        check_module(module, tensors)
    return VerifyReport(str(dst), files, len(tensors), len(modules), bytes_hashed)


# -- 1. files against the manifest ---------------------------------------------------------


def _read_manifest(dst: Path) -> dict[str, Any]:
    path = dst / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a finished scoutq output (the manifest is written last)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise CheckpointError(f"{path}: not valid JSON ({bad})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    fmt = manifest.get("format")
    if fmt is not None and fmt != "scoutq-manifest/1":
        raise CheckpointError(f"{path}: unsupported manifest format {fmt!r} (expected 'scoutq-manifest/1')")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: missing or empty 'files' (file name -> sha256)")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            raise CheckpointError(f"{path}: file {name!r} has no valid sha256 (got {digest!r})")
        candidate = Path(name)
        if not name or candidate.is_absolute() or ".." in candidate.parts or "\x00" in name:
            raise CheckpointError(f"{path}: file name {name!r} points outside the output directory")
        if name == MANIFEST_NAME:
            raise CheckpointError(f"{path}: lists itself; the manifest hashes every *other* file")
    return manifest


def _present_files(dst: Path) -> list[str]:
    """Every file under dst (relative POSIX paths), symlinks included, directories not."""
    found = []
    for root, dirs, names in os.walk(dst):
        base = Path(root).relative_to(dst)
        found += [(base / name).as_posix() for name in names]
        found += [(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(found)


def check_files(dst: Path, manifest: dict[str, Any], on_progress: ProgressHook | None = None) -> tuple[int, int]:
    """(files, bytes) hashed; every listed file present and matching, nothing unlisted."""
    listed: dict[str, str] = {name: digest.lower() for name, digest in manifest["files"].items()}
    for name in listed:
        if not (dst / name).is_file():
            raise CheckpointError(f"{dst / name}: missing (listed in {MANIFEST_NAME})")
    for name in _present_files(dst):
        if name != MANIFEST_NAME and name not in listed:
            raise CheckpointError(f"{dst / name}: not listed in {MANIFEST_NAME} (a file the output should not hold)")

    sizes = {name: (dst / name).stat().st_size for name in listed}
    total = sum(sizes.values())
    if on_progress:
        on_progress(0, total)
    hashed = 0

    def advance(count: int) -> None:
        nonlocal hashed
        hashed += count
        if on_progress:
            on_progress(count, total)

    for name, recorded in listed.items():
        digest = file_sha256(dst / name, on_bytes=advance)
        if digest != recorded:
            raise CheckpointError(
                f"{dst / name}: sha256 {digest[:16]}... does not match the manifest's {recorded[:16]}... "
                "(the file changed after it was written)"
            )
    return len(listed), hashed


# -- 2. config.json --------------------------------------------------------------------------


# -- 3. tensors against the config -----------------------------------------------------------


def read_tensors(dst: Path) -> dict[str, TensorInfo]:
    """Every stored tensor (headers only), the index checked against the shards."""
    index_path = dst / INDEX_NAME
    if index_path.is_file():
        index = read_index(dst)
        weight_map = index["weight_map"]
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise CheckpointError(f"{index_path}: tensor {name!r} maps to invalid shard file name {file!r}")
        shards = sorted({dst / file for file in weight_map.values()})
    elif (dst / SINGLE_NAME).is_file():
        weight_map, shards = None, [dst / SINGLE_NAME]
    else:
        raise CheckpointError(f"{dst}: no {INDEX_NAME} or {SINGLE_NAME}; not a safetensors checkpoint")

    for stray in sorted(dst.glob("*.safetensors")):
        if stray not in shards:
            raise CheckpointError(f"{stray}: a safetensors file the index does not name")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard missing (named in {INDEX_NAME})")
        stored, _ = read_header(shard)
        for name, info in stored.items():
            if name in tensors:
                raise CheckpointError(f"{shard}: tensor {name!r} is also stored in {tensors[name].file.name}")
            if weight_map is not None and weight_map.get(name) != shard.name:
                where = (f"the index maps it to {weight_map[name]}" if name in weight_map
                         else "the index does not name it")
                raise CheckpointError(f"{shard}: stores tensor {name!r} but {where}")
            tensors[name] = info
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors:
                raise CheckpointError(
                    f"{dst / file}: tensor {name!r} is named in {INDEX_NAME} but not stored in this shard")
        total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        stored_bytes = sum(info.nbytes for info in tensors.values())
        if total is not None and total != stored_bytes:
            raise CheckpointError(
                f"{index_path}: metadata.total_size is {total} but the shards hold {stored_bytes} bytes of tensors")
    return tensors


def _layout(config_json: dict[str, Any], tensors: dict[str, TensorInfo]) -> Layout:
    if config_json.get("model_type") == "llama4":
        return MULTIMODAL
    return detect_layout(tensors.keys()) or TEXT_ONLY


def expected_tensors(
    config_path: Path,
    config_json: dict[str, Any],
    config: TextConfig,
    layout: Layout,
    groups: list[QuantGroup],
    ignore: tuple[str, ...],
) -> tuple[dict[str, Expected], list[QuantModule]]:
    """Every tensor config.json and its quantization_config imply, and the quantized modules."""
    dtype = SOURCE_DTYPES.get(config.torch_dtype)
    if dtype is None:
        raise ConfigError(f"{config_path}: dtype {config.torch_dtype!r} is not one of {sorted(SOURCE_DTYPES)}")
    source = expected_text_shapes(config, layout)
    vision = config_json.get("vision_config")
    if layout is MULTIMODAL and isinstance(vision, dict):
        try:
            source |= expected_vision_shapes(vision, config.hidden_size)
        except (KeyError, TypeError, ValueError) as bad:
            raise ConfigError(f"{config_path}: vision_config is incomplete or invalid ({bad!r})") from None

    # Linear modules ([out, in]) and the non-Linear tensors copied as they are.
    linears: list[tuple[str, tuple[int, int]]] = []
    expected: dict[str, Expected] = {}
    for key, shape in source.items():
        role = layout.classify(key).role
        if role in (Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN):
            experts, rows, cols = shape
            layer = layout.classify(key).layer or 0
            for e in range(experts):
                for proj in ("gate", "up") if role == Role.EXPERTS_GATE_UP else ("down",):
                    out = cols // 2 if proj != "down" else cols
                    linears.append((layout.layer_key(layer, f"feed_forward.experts.{e}.{proj}_proj"), (out, rows)))
        elif key.endswith(".weight") and len(shape) == 2 and role not in (Role.EMBED, Role.UNKNOWN):
            linears.append((key.removesuffix(".weight"), (shape[0], shape[1])))
        else:
            expected[key] = Expected(dtype, shape, "config.json")

    modules: list[QuantModule] = []
    for name, (out, inp) in linears:
        group = group_for(name, groups, ignore, config_path)
        if group is None:
            why = "config.json (not quantized by quantization_config)"
            expected[f"{name}.weight"] = Expected(dtype, (out, inp), why)
            continue
        modules.append(QuantModule(name, group, (out, inp)))
        why = f"quantization_config {group.name} ({group.scheme.describe()})"
        for suffix, (shape, kind) in packed_shapes(out, inp, group.scheme).items():
            expected[f"{name}.{suffix}"] = Expected(dtype if kind == "SRC" else kind, shape, why)
    return expected, modules


def check_tensors(dst: Path, tensors: dict[str, TensorInfo], expected: dict[str, Expected],
                  modules: list[QuantModule]) -> None:
    for name, info in tensors.items():
        if info.name in expected:
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            raise CheckpointError(f"{info.file}: tensor {name!r} is a fused routed-expert tensor; a compressed-tensors "
                                  "checkpoint stores routed experts per expert as 2-D keys (experts.N.gate_proj, ...)")
    for name, want in expected.items():
        info = tensors.get(name)
        if info is None:
            module, _, suffix = name.rpartition(".")
            if suffix == "weight" and f"{module}.weight_packed" in tensors:
                raise CheckpointError(f"{tensors[f'{module}.weight_packed'].file}: module {module!r} is stored packed "
                                      f"but quantization_config leaves it unquantized (expects {name!r})")
            if suffix.startswith("weight_") and f"{module}.weight" in tensors:
                raise CheckpointError(f"{tensors[f'{module}.weight'].file}: module {module!r} is stored unquantized "
                                      f"but {want.why} quantizes it (expects {name!r})")
            sibling = next((tensors[f"{module}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")
                            if f"{module}.{s}" in tensors), None)
            where = sibling.file if sibling is not None else dst
            raise CheckpointError(f"{where}: tensor {name!r} is missing ({want.why} implies it)")
        if info.dtype != want.dtype:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype} but {want.why} implies {want.dtype}")
        if info.shape != want.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)} but {want.why} "
                                  f"implies {list(want.shape)}")
    for name, info in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (config.json and its quantization_config "
                                  "do not imply it)")
    for module in modules:
        info = tensors[f"{module.name}.weight_shape"]
        value = [int(v) for v in read_rows(info, 0, info.shape[0]).tolist()]
        if value != list(module.shape):
            raise CheckpointError(f"{info.file}: tensor {info.name!r} holds {value} but config.json implies "
                                  f"[out, in] = {list(module.shape)}")


# -- 4. quantized values -------------------------------------------------------------------------


def _read(info: TensorInfo) -> torch.Tensor:
    return read_rows(info, 0, info.shape[0]) if info.shape else read_rows(info, 0, 1).reshape(())


def check_module(module: QuantModule, tensors: dict[str, TensorInfo]) -> None:
    """Unpack one quantized module, row block by row block, and check its scales and values."""
    scheme = module.group.scheme
    infos = {suffix: tensors[f"{module.name}.{suffix}"] for suffix in packed_shapes(*module.shape, scheme)}
    state = {suffix: _read(info) for suffix, info in infos.items() if suffix != "weight_packed"}

    scale, scale_info = state["weight_scale"], infos["weight_scale"]
    bad = ~torch.isfinite(scale) | (scale == 0)
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        value = float(scale[row, group])
        raise CheckpointError(f"{scale_info.file}: tensor {scale_info.name!r} has {int(bad.sum())} scale(s) that are "
                              f"not finite and non-zero (first: {value} at row {row}, group {group})")

    packed_info = infos["weight_packed"]
    empty = torch.empty((0, packed_info.shape[1]), dtype=torch.int32)
    try:
        whole = PackedWeight.from_state({**state, "weight_packed": empty}, scheme)
    except (RuntimeError, ValueError) as bad_state:
        raise CheckpointError(f"{packed_info.file}: module {module.name!r} does not unpack ({bad_state})") from None

    out_features, in_features = module.shape
    row_bytes = max(packed_info.nbytes // max(out_features, 1), 1)
    step = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        block = replace(whole, packed=read_rows(packed_info, start, stop), shape=(stop - start, in_features))
        try:
            values = block.unpacked()
        except (RuntimeError, ValueError) as bad_block:
            raise CheckpointError(
                f"{packed_info.file}: tensor {packed_info.name!r} does not unpack ({bad_block})") from None
        if tuple(values.shape) != (stop - start, in_features):
            raise CheckpointError(f"{packed_info.file}: tensor {packed_info.name!r} rows {start}..{stop} unpack to "
                                  f"{list(values.shape)}, expected {[stop - start, in_features]}")


__all__ = ["ProgressHook", "VerifyReport", "group_for", "target_matches", "verify_output"]
