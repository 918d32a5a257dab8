"""The runtime for scoutq-quantized checkpoints: packed weights stay packed.

Each quantized Linear becomes a `QuantLinear` and each layer's routed experts a
`QuantExperts`, both holding weights repacked once for the chosen kernel backend
(scoutq.kernels); nothing is dequantized to a full-precision copy, except by the `reference`
backend, which dequantizes on every call because it is the oracle. Everything else (norms,
router, embeddings, unquantized Linears) is loaded as in the bf16 model.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import CheckpointError
from scoutq.foreign import WeightSource, weight_source
from scoutq.kernels import Backend, QuantMatmul, prepare
from scoutq.model.llama4 import Llama4ForCausalLM
from scoutq.model.moe import ExpertGroups
from scoutq.quant.packed import PackedWeight


def method_of(matmul: object, rows: int) -> str:
    """The kernel `matmul` runs for `rows` rows: a TokenDispatch (kernels/cpu.py) picks by the
    count; any other prepared weight is one kernel, named by its class."""
    method = getattr(matmul, "method", None)
    return method(rows) if callable(method) else type(matmul).__name__


class QuantLinear(nn.Module):
    """y = x @ W.T for a packed W; any leading dims. Counts the calls of each kernel it runs."""

    def __init__(self, matmul: QuantMatmul):
        super().__init__()
        self.matmul = matmul
        self.calls: Counter[str] = Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        self.calls[method_of(self.matmul, rows.shape[0])] += 1
        y = self.matmul(rows)
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.matmul.in_features} -> {self.matmul.out_features}, {type(self.matmul).__name__}"


class QuantExperts(nn.Module):
    """A layer's routed experts, gate and up fused into one packed [2F, D] weight per expert."""

    def __init__(self, gate_up: list[QuantMatmul], down: list[QuantMatmul]):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.calls: Counter[str] = Counter()

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        self.calls[method_of(self.gate_up[expert], x.shape[0])] += 2  # gate_up, then down, on the same rows
        gate, up = self.gate_up[expert](x).chunk(2, dim=-1)
        return self.down[expert](F.silu(gate) * up)


class GroupedExperts(nn.Module):
    """A layer's routed experts run together by the grouped GPU kernel (kernels/triton_moe.py):
    MoE.forward calls `grouped` instead of dispatching expert by expert."""

    def __init__(self, gate_up: list[PackedWeight], down: list[PackedWeight], device: str | torch.device):
        super().__init__()
        from scoutq.kernels.triton_moe import TritonExperts

        self.kernel = TritonExperts(gate_up, down, device)
        self.calls: Counter[str] = Counter()

    def grouped(self, x: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        self.calls["triton grouped MoE"] += 2  # one launch for gate_up, one for down
        groups = ExpertGroups.of(scores, experts, self.kernel.num_experts)
        return self.kernel(x, groups.tokens, groups.scores, groups.bounds)


def kernels_used(model: nn.Module) -> dict[str, int]:
    """The kernels the model's quantized weights have run, with their numbers of calls (launches)."""
    used: Counter[str] = Counter()
    for module in model.modules():
        used.update(getattr(module, "calls", Counter()) if isinstance(module, QuantLinear | QuantExperts |
                                                                       GroupedExperts) else Counter())
    return dict(sorted(used.items()))


def concat_rows(weights: list[PackedWeight]) -> PackedWeight:
    """Stack packed weights along the output dimension (packing is per row, so this is exact)."""
    first = weights[0]
    if any(w.scheme != first.scheme or w.shape[1] != first.shape[1] for w in weights):
        raise CheckpointError("gate and up projections of an expert must share one scheme and input width")
    zeros = None if first.zero_point is None else torch.cat([w.zero_point for w in weights])  # type: ignore[misc]
    return PackedWeight(first.scheme, torch.cat([w.packed for w in weights]), torch.cat([w.scale for w in weights]),
                        zeros, (sum(w.shape[0] for w in weights), first.shape[1]))


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def load_quantized(checkpoint: Checkpoint, device: str | torch.device, dtype: torch.dtype,
                   backend: Backend) -> Llama4ForCausalLM:
    """Build the model from a quantized checkpoint: scoutq's compressed-tensors output or any
    format scoutq.foreign reads. Packed weights run on the packed kernels; weights a format can
    only give dense (act-order groups, bitsandbytes) are dequantized once at load."""
    config, layout = checkpoint.config, checkpoint.layout
    source = weight_source(checkpoint)
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    state: dict[str, torch.Tensor] = {}

    def dense(key: str) -> torch.Tensor:
        return checkpoint.read(key).to(device=device, dtype=dtype)

    def linear(param_path: str, module: str) -> None:
        found = source.weight(module)
        if found is None:
            state[f"{param_path}.weight"] = dense(f"{module}.weight")
        elif isinstance(found, PackedWeight):
            _set_module(model, param_path, QuantLinear(prepare(found, backend, device)))
        else:
            state[f"{param_path}.weight"] = found.to(device=device, dtype=dtype)

    state["embed_tokens.weight"] = dense(layout.embed_key)
    state["norm.weight"] = dense(layout.norm_key)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    else:
        linear("lm_head", layout.lm_head_key.removesuffix(".weight"))
    for i in range(config.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"layers.{i}.{norm}.weight"] = dense(layout.layer_key(i, f"{norm}.weight"))
        parts = [f"self_attn.{p}_proj" for p in "qkvo"]
        if config.is_moe_layer(i):
            state[f"layers.{i}.feed_forward.router.weight"] = dense(layout.layer_key(i, "feed_forward.router.weight"))
            parts += [f"feed_forward.shared_expert.{p}_proj" for p in ("gate", "up", "down")]
            _load_experts(checkpoint, source, model, state, i, device, dtype, backend)
        else:
            parts += [f"feed_forward.{p}_proj" for p in ("gate", "up", "down")]
        for part in parts:
            linear(f"layers.{i}.{part}", layout.layer_key(i, part))
    model.load_state_dict(state, assign=True, strict=False)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{checkpoint.directory}: no weights found for {leftover[0]}")
    return model.eval().requires_grad_(False)


def _load_experts(checkpoint: Checkpoint, source: WeightSource, model: Llama4ForCausalLM,
                  state: dict[str, torch.Tensor], layer: int, device: str | torch.device, dtype: torch.dtype,
                  backend: Backend) -> None:
    """A layer's routed experts: packed (QuantExperts, or the grouped GPU kernel) when every one is
    a PackedWeight, else stacked dense; fused 3-D tensors (a format that left experts unquantized)
    are read as the bf16 loader reads them."""
    layout, experts = checkpoint.layout, checkpoint.config.num_local_experts
    prefix = f"layers.{layer}.feed_forward.experts."
    if layout.gate_up_key(layer) in checkpoint.tensors:  # fused [E, in, out]: nn.Linear's [E, out, in]
        state[prefix + "gate_up"] = dense_fused(checkpoint.read(layout.gate_up_key(layer)), device, dtype)
        state[prefix + "down"] = dense_fused(checkpoint.read(layout.down_key(layer)), device, dtype)
        return
    names = {(e, p): layout.layer_key(layer, f"feed_forward.experts.{e}.{p}_proj")
             for e in range(experts) for p in ("gate", "up", "down")}
    found = {key: source.weight(name) for key, name in names.items()}
    packed = {key: weight for key, weight in found.items() if isinstance(weight, PackedWeight)}
    if len(packed) == len(found) and _fusable(packed, experts):
        fused = [concat_rows([packed[(e, "gate")], packed[(e, "up")]]) for e in range(experts)]
        downs = [packed[(e, "down")] for e in range(experts)]
        if backend == Backend.CUDA:
            module: nn.Module = GroupedExperts(fused, downs, device)
        else:
            module = QuantExperts([prepare(w, backend, device) for w in fused],
                                  [prepare(w, backend, device) for w in downs])
        _set_module(model, f"layers.{layer}.feed_forward.experts", module)
        return

    def dense(key: tuple[int, str]) -> torch.Tensor:
        weight = found[key]
        if weight is None:
            return checkpoint.read(names[key] + ".weight")
        return weight.dequantize() if isinstance(weight, PackedWeight) else weight

    state[prefix + "gate_up"] = torch.stack([torch.cat([dense((e, "gate")).to(dtype), dense((e, "up")).to(dtype)])
                                             for e in range(experts)]).to(device)
    state[prefix + "down"] = torch.stack([dense((e, "down")).to(dtype) for e in range(experts)]).to(device)


def dense_fused(tensor: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    return tensor.transpose(-1, -2).to(device=device, dtype=dtype).contiguous()


def _fusable(packed: dict[tuple[int, str], PackedWeight], experts: int) -> bool:
    """gate and up of every expert share a scheme (they run as one fused weight)."""
    return all(packed[(e, "gate")].scheme == packed[(e, "up")].scheme for e in range(experts))
