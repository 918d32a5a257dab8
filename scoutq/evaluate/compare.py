"""`compare_models`: a candidate (quantized) model against a reference on the same token windows.

Both models are resident and see identical inputs batch by batch. Only per-token scalars
(NLL, KL, top-1 match) and per-layer counters survive a batch; the [B, T, V] logits are
dropped before the next one, so memory does not grow with the number of windows.

Routing is read with forward hooks on each MoE router (its output is the router logits; the
MoE block routes to their top-k). Hooks are attached around one model's forward only, so
comparing a model with itself (the same module object) records each pass separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from scoutq.errors import ScoutqError
from scoutq.evaluate.metrics import (
    Perplexity,
    kl_divergence,
    perplexity_with_interval,
    same_expert_sets,
    summarize_kl,
    token_log_probs,
    top1_agreement,
)
from scoutq.model.moe import MoE

if TYPE_CHECKING:  # annotations only: typing.Self is Python 3.11+
    from typing import Self


def moe_blocks(model: nn.Module) -> list[tuple[int, MoE]]:
    """(decoder layer index, MoE block) of every MoE layer, in layer order."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"expected a Llama 4 model with a `layers` ModuleList, got {type(model).__name__}")
    return [(i, layer.feed_forward) for i, layer in enumerate(layers) if isinstance(layer.feed_forward, MoE)]


class RouterHooks:
    """While open, records the top-k experts each MoE router picks for each token.

    Use as `with RouterHooks(model) as hooks: model(ids)`, then `hooks.experts()`. The top-k is
    recomputed from the router logits exactly as `moe.route` does (torch.topk, same k), so the
    recorded experts are the ones the block dispatched to.
    """

    def __init__(self, model: nn.Module):
        self.blocks = moe_blocks(model)
        self._recorded: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Self:
        for slot, (_, moe) in enumerate(self.blocks):
            self._handles.append(moe.router.register_forward_hook(partial(self._record, slot, moe.top_k)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, slot: int, top_k: int, _module: nn.Module, _inputs: object, logits: torch.Tensor) -> None:
        self._recorded[slot].append(torch.topk(logits, top_k, dim=-1).indices)

    def experts(self) -> list[torch.Tensor]:
        """Per MoE layer, [N, k] int64 experts of all tokens routed since the last call."""
        taken = [torch.cat(parts) if parts else torch.empty(0, 1, dtype=torch.int64) for parts in self._recorded]
        self._recorded = [[] for _ in self.blocks]
        return taken


@dataclass
class Comparison:
    """What `compare_models` measured. Reference-only fields are None without a reference.

    Perplexities carry 95% intervals over windows; `kl` is `summarize_kl`'s dict (mean with
    interval, median, p99, max). `routing_agreement` maps each MoE layer's decoder index to the
    share of tokens routed to the same expert set by both models. Expert counts are [MoE
    layers, experts] int64 routing slots (tokens * k per layer), rows in `moe_layers` order.
    `window_nll` holds each window's mean NLL, so later comparisons can pair by window.
    """

    windows: int
    tokens_scored: int
    perplexity: Perplexity
    window_nll: torch.Tensor  # [W] fp64
    moe_layers: list[int]
    expert_counts: torch.Tensor  # [len(moe_layers), E] int64
    reference_perplexity: Perplexity | None = None
    reference_window_nll: torch.Tensor | None = None
    reference_expert_counts: torch.Tensor | None = None
    kl: dict[str, float] | None = None
    top1_agreement: float | None = None
    routing_agreement: dict[int, float] | None = None
    window_kl: torch.Tensor | None = None  # [W] each window's mean KL, for pairing candidates by window
    window_tokens: torch.Tensor | None = None  # [W] scored tokens of each window


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_models(candidate: nn.Module, reference: nn.Module | None, windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ScoutqError(f"expected token windows [W >= 1, T >= 2], got shape {tuple(windows.shape)}")
    if windows.is_floating_point() or windows.is_complex():
        raise ScoutqError(f"token windows must hold integer ids, got {windows.dtype}")
    vocab = candidate.config.vocab_size  # type: ignore[union-attr]
    if int(windows.min()) < 0 or int(windows.max()) >= vocab:
        raise ScoutqError(f"token ids span {int(windows.min())}..{int(windows.max())} but the model's vocabulary has "
                          f"{vocab} entries (was the text encoded with this checkpoint's tokenizer?)")
    if reference is None:
        return
    ref_vocab = reference.config.vocab_size  # type: ignore[union-attr]
    if ref_vocab != vocab:
        raise ScoutqError(f"the reference has a vocabulary of {ref_vocab} tokens, the candidate {vocab}")
    ours, theirs = moe_blocks(candidate), moe_blocks(reference)
    shape = [(i, m.num_experts, m.top_k) for i, m in ours]
    if shape != [(i, m.num_experts, m.top_k) for i, m in theirs]:
        raise ScoutqError("the reference and the candidate differ in MoE layers, expert count or experts per token")


def _run(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [B*T, V] and per-layer experts [B*T, k] of one forward pass."""
    with RouterHooks(model) as hooks:
        logits = model(inputs.to(_device(model)))
    return logits.flatten(0, 1), hooks.experts()


def _count(counts: torch.Tensor, experts: list[torch.Tensor]) -> None:
    for row, chosen in enumerate(experts):
        counts[row] += torch.bincount(chosen.flatten(), minlength=counts.shape[1]).cpu()


@torch.inference_mode()
def compare_models(
    candidate: nn.Module,
    reference: nn.Module | None,
    windows: torch.Tensor,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    scored: torch.Tensor | None = None,
) -> Comparison:
    """Score the candidate (and the reference) on every window, and compare them token by token.

    Within each window, tokens 1..T-1 are scored, each predicted from its prefix in the window
    (as the tiny-trained fixture's evaluation does). Every model input token is routed, so the
    routing statistics cover positions 0..T-2.

    Args:
        candidate: the model under test: `model(ids [B, T]) -> logits [B, T, V]` (scoutq's
            Llama4ForCausalLM, bf16 or quantized).
        reference: the model to compare against (usually bf16), or None for perplexity and
            routing counts of the candidate alone.
        windows: [W, T] int64 token ids (`evaluation_windows`).
        batch_size: windows per forward pass; bounds memory (B * T * V logits per model).
        on_batch: called after each batch with the number of windows done so far.
        scored: [W, T-1] bool, which targets count (`document_windows`: padding and repeated
            context do not); every statistic, routing included (the inputs of scored targets),
            is taken over those only. None scores every target, as above.

    Returns:
        A Comparison; KL, top-1 and routing agreement are None when reference is None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_models(candidate, reference, windows)
    count, length = windows.shape
    if scored is None:
        scored = torch.ones(count, length - 1, dtype=torch.bool)
    if scored.shape != (count, length - 1) or scored.dtype != torch.bool or not bool(scored.any(dim=1).all()):
        raise ScoutqError(f"scored must be a [{count}, {length - 1}] bool mask with a scored token in every window")
    blocks = moe_blocks(candidate)
    experts = blocks[0][1].num_experts if blocks else 0
    counts = torch.zeros(len(blocks), experts, dtype=torch.int64)
    ref_counts = counts.clone() if reference is not None else None
    window_nll: list[torch.Tensor] = []
    ref_window_nll: list[torch.Tensor] = []
    kl_parts: list[torch.Tensor] = []
    window_kl: list[torch.Tensor] = []
    top1 = 0
    same_route = torch.zeros(len(blocks), dtype=torch.int64)
    routed = 0
    per_window = scored.sum(dim=1)

    def window_means(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """[B] mean of each window's scored values (values [B*(T-1)] on any device)."""
        kept = torch.where(keep, values.view(keep.shape).cpu(), torch.zeros((), dtype=values.dtype))
        return kept.sum(dim=1) / keep.sum(dim=1)

    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size]
        keep = scored[start : start + batch_size]
        flat_keep = keep.flatten()
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        logits, chosen = _run(candidate, inputs)
        window_nll.append(window_means(token_log_probs(logits, targets), keep))
        chosen = [experts[flat_keep.to(experts.device)] for experts in chosen]
        _count(counts, chosen)
        if reference is not None and ref_counts is not None:
            ref_logits, ref_chosen = _run(reference, inputs)
            ref_chosen = [experts[flat_keep.to(experts.device)] for experts in ref_chosen]
            ref_window_nll.append(window_means(token_log_probs(ref_logits, targets), keep))
            _count(ref_counts, ref_chosen)
            ref_logits = ref_logits.to(logits.device)
            kl = kl_divergence(ref_logits, logits).cpu()
            kl_parts.append(kl[flat_keep])
            window_kl.append(window_means(kl, keep))
            top1 += int(top1_agreement(ref_logits, logits).cpu()[flat_keep].sum())
            for row, (ours, theirs) in enumerate(zip(chosen, ref_chosen, strict=True)):
                same_route[row] += int(same_expert_sets(theirs, ours).sum())
            routed += int(flat_keep.sum())
            del ref_logits
        del logits
        if on_batch is not None:
            on_batch(min(count, start + batch_size))

    nll = torch.cat(window_nll)
    result = Comparison(
        windows=count,
        tokens_scored=int(per_window.sum()),
        perplexity=perplexity_with_interval(nll, per_window),
        window_nll=nll,
        moe_layers=[i for i, _ in blocks],
        expert_counts=counts,
    )
    if reference is not None:
        ref_nll = torch.cat(ref_window_nll)
        result.reference_perplexity = perplexity_with_interval(ref_nll, per_window)
        result.reference_window_nll = ref_nll
        result.reference_expert_counts = ref_counts
        result.window_kl, result.window_tokens = torch.cat(window_kl).double(), per_window
        result.kl = summarize_kl(torch.cat(kl_parts), window_means=result.window_kl, window_tokens=per_window)
        result.top1_agreement = top1 / result.tokens_scored
        result.routing_agreement = {i: int(same) / routed for (i, _), same in zip(blocks, same_route, strict=True)}
    return result
