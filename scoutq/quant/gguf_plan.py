"""The GGUF file a recipe makes of a Llama 4 checkpoint: llama.cpp's tensor names, types, shapes.

Names follow llama.cpp's `llama4` architecture (its src/llama-arch.cpp and the loader in
src/models/llama4.cpp): routed experts are stacked into one 3-D tensor per projection,
`blk.N.ffn_{gate,up,down}_exps.weight` [experts, out, in]; the shared expert is
`ffn_*_shexp`, the router `ffn_gate_inp` (kept in F32), norms F32. Shapes here are row-major
(torch's order); GGUF stores the reverse (ggml's ne[0] is the row length). The vision tower
and projector are not part of a llama.cpp text model (llama.cpp keeps them in a separate
mmproj file) and are left out.

Like the safetensors plan, this is computed from headers alone and fixes the file completely
(names, types, byte sizes, order), which is what makes the export resumable and
byte-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scoutq.checkpoint.layout import Role
from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ScoutqError
from scoutq.quant.ggml import BLOCK_TYPES
from scoutq.quant.plan import PlannedModule, QuantPlan

ARCHITECTURE = "llama4"
FLOAT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
SOURCE_KINDS = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

# Per-layer tensors by role; experts and the dense MLP are handled by their projection.
LAYER_NAMES = {
    Role.INPUT_NORM: "attn_norm",
    Role.ATTN_Q: "attn_q",
    Role.ATTN_K: "attn_k",
    Role.ATTN_V: "attn_v",
    Role.ATTN_O: "attn_output",
    Role.POST_ATTN_NORM: "ffn_norm",
    Role.ROUTER: "ffn_gate_inp",
    Role.SHARED_GATE: "ffn_gate_shexp",
    Role.SHARED_UP: "ffn_up_shexp",
    Role.SHARED_DOWN: "ffn_down_shexp",
    Role.MLP_GATE: "ffn_gate",
    Role.MLP_UP: "ffn_up",
    Role.MLP_DOWN: "ffn_down",
}
GLOBAL_NAMES = {Role.EMBED: "token_embd", Role.FINAL_NORM: "output_norm", Role.LM_HEAD: "output"}
KEPT_IN_F32 = frozenset({Role.INPUT_NORM, Role.POST_ATTN_NORM, Role.FINAL_NORM, Role.ROUTER})
NOT_IN_GGUF = frozenset({Role.VISION, Role.PROJECTOR})
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file and the planned modules its data is made of, in order (one per
    expert for a stacked expert tensor; none for rope_freqs, which is computed)."""

    name: str
    kind: str  # ggml type: f32, f16, bf16, q4_0, q8_0, q4_k
    shape: tuple[int, ...]  # row-major; the last dimension is the row (a block run for quantized kinds)
    parts: tuple[PlannedModule, ...]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        if self.kind in FLOAT_BYTES:
            return self.shape[-1] * FLOAT_BYTES[self.kind]
        return BLOCK_TYPES[self.kind].row_bytes(self.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def bytes_in(self) -> int:
        return sum(part.bytes_in for part in self.parts)


def _kind(item: PlannedModule) -> str:
    if item.scheme is not None:
        assert item.scheme.ggml is not None, "a gguf plan's schemes are ggml types"
        return item.scheme.ggml
    if item.module.role in KEPT_IN_F32:
        return "f32"
    kind = SOURCE_KINDS.get(item.module.source_dtype)
    if kind is None:
        raise ScoutqError(f"{item.module.source}: dtype {item.module.source_dtype} has no GGUF float type")
    return kind


def gguf_tensors(checkpoint: Checkpoint, plan: QuantPlan) -> list[GgufTensor]:
    """Every tensor of the GGUF file, in file order: token_embd, rope_freqs (llama3 RoPE), each
    layer's attention, norms and feed-forward, then output_norm and output."""
    config = checkpoint.config
    by_layer: dict[int, list[PlannedModule]] = {}
    globals_: dict[Role, PlannedModule] = {}
    for item in plan.items:
        role = item.module.role
        if role in NOT_IN_GGUF:
            continue
        if role in GLOBAL_NAMES:
            globals_[role] = item
        elif item.module.layer is not None and (role in LAYER_NAMES or item.module.expert is not None):
            by_layer.setdefault(item.module.layer, []).append(item)
        else:
            raise ScoutqError(f"{item.module.source}: no llama.cpp tensor for this key (role {role.value})")

    tensors: list[GgufTensor] = []
    if Role.EMBED not in globals_:
        raise ScoutqError(f"{checkpoint.directory}: no token embedding in the checkpoint")
    tensors.append(_single("token_embd.weight", globals_[Role.EMBED]))
    if config.rope.rope_type == "llama3":
        tensors.append(GgufTensor(ROPE_FREQS, "f32", (config.head_dim // 2,), ()))
    for layer in range(config.num_hidden_layers):
        tensors.extend(_layer_tensors(layer, by_layer.get(layer, [])))
    tensors.append(_single("output_norm.weight", globals_[Role.FINAL_NORM]))
    if Role.LM_HEAD in globals_:
        tensors.append(_single("output.weight", globals_[Role.LM_HEAD]))
    _lint_blocks(tensors)
    return tensors


def _single(name: str, item: PlannedModule) -> GgufTensor:
    return GgufTensor(name, _kind(item), tuple(item.module.shape), (item,))


def _layer_tensors(layer: int, items: list[PlannedModule]) -> list[GgufTensor]:
    experts: dict[str, list[PlannedModule]] = {"gate": [], "up": [], "down": []}
    named: dict[str, GgufTensor] = {}
    for item in items:
        module = item.module
        if module.expert is not None:
            assert module.proj is not None
            experts[module.proj].append(item)
        else:
            name = f"blk.{layer}.{LAYER_NAMES[module.role]}.weight"
            named[name] = _single(name, item)
    for proj, parts in experts.items():
        if not parts:
            continue
        parts.sort(key=lambda item: item.module.expert or 0)
        kinds = {_kind(part) for part in parts}
        if len(kinds) != 1:
            raise ScoutqError(f"layer {layer}: routed {proj}_proj experts would get types {sorted(kinds)}; "
                              "a stacked GGUF expert tensor has one type")
        name = f"blk.{layer}.ffn_{proj}_exps.weight"
        named[name] = GgufTensor(name, kinds.pop(), (len(parts), *parts[0].module.shape), tuple(parts))
    order = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
             "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
             "ffn_gate", "ffn_up", "ffn_down"]
    return [named[f"blk.{layer}.{part}.weight"] for part in order if f"blk.{layer}.{part}.weight" in named]


def _lint_blocks(tensors: list[GgufTensor]) -> None:
    for tensor in tensors:
        block = BLOCK_TYPES[tensor.kind].block if tensor.kind in BLOCK_TYPES else 1
        if tensor.shape[-1] % block:
            raise ScoutqError(f"{tensor.name}: rows of {tensor.shape[-1]} values do not divide into "
                              f"{tensor.kind} blocks of {block}; choose another ggml_type for it")
