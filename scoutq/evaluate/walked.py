"""Evaluation of a model larger than memory: the layer stream instead of a resident model.

The evaluation windows' hidden states pass through the checkpoint one decoder layer at a time
(scoutq.stream: this module is a client that keeps the weights as stored and records the
routing), so peak memory is one layer plus the hidden states. At the end the final norm and
lm_head run over the vocabulary in row blocks, and only per-token results are kept:

    NLL of the target, argmax, the top-k log-probabilities with their token ids,
    and, when a reference is given, this model's log-probabilities at the reference's top-k ids.

A reference walked once is stored (`save_reference`) and reused for every candidate. KL
divergence from a stored top-k is llama.cpp's approximation: the k largest reference
probabilities plus one bucket for the rest,

    KL ~ sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),

exact when k is the vocabulary size, and a lower bound of the true KL otherwise (merging
outcomes never increases a KL divergence). The routing of every token is kept too, for
routing agreement.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.writer import atomic_path
from scoutq.errors import ScoutqError
from scoutq.evaluate.compare import Comparison
from scoutq.evaluate.metrics import perplexity_with_interval, summarize_kl
from scoutq.stream.hooks import StreamClient
from scoutq.stream.walk import LayerStream

REFERENCE_FORMAT = "scoutq-reference-topk/1"


@dataclass
class TokenScores:
    """Per scored token of [W, T] windows (N = W * (T - 1) tokens, window-major)."""

    windows: torch.Tensor  # [W, T] int64, the evaluated tokens
    nll: torch.Tensor  # [N] fp64
    argmax: torch.Tensor  # [N] int64
    top_ids: torch.Tensor  # [N, k] int64
    top_logprobs: torch.Tensor  # [N, k] fp32
    routing: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [N_inputs, top_k] experts
    at_reference: torch.Tensor | None = None  # [N, k] this model's log-probs at the reference's top ids


class RoutingRecorder(StreamClient):
    """The evaluation client: computes with the weights as stored, keeps each MoE layer's routing."""

    def __init__(self) -> None:
        self.chosen: dict[int, torch.Tensor] = {}  # MoE layer -> [N, k] experts

    def routing(self, layer: int, experts: torch.Tensor) -> None:
        self.chosen[layer] = experts.cpu()


def _head_scores(stream: LayerStream, hidden: torch.Tensor, targets: torch.Tensor, top_k: int,
                 reference_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One pass over lm_head in row blocks with running log-sum-exp, argmax and top-k."""
    tokens = hidden.shape[0]
    k = min(top_k, stream.config.vocab_size)
    on = hidden.device
    running_max = torch.full((tokens,), -torch.inf, dtype=torch.float64, device=on)
    running_sum = torch.zeros(tokens, dtype=torch.float64, device=on)
    target_logit = torch.zeros(tokens, dtype=torch.float64, device=on)
    top_values = torch.full((tokens, k), -torch.inf, device=on)
    top_ids = torch.zeros(tokens, k, dtype=torch.int64, device=on)
    at_reference = None if reference_ids is None else torch.zeros(reference_ids.shape, dtype=torch.float64, device=on)
    for start, logits in stream.logit_blocks(hidden):  # [tokens, block] fp32
        stop = start + logits.shape[1]
        block = logits.double()
        block_max = block.amax(dim=1)
        new_max = torch.maximum(running_max, block_max)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(block - new_max[:, None]).sum(dim=1)
        running_max = new_max
        inside = (targets >= start) & (targets < stop)
        target_logit[inside] = block[inside, targets[inside] - start]
        values, ids = torch.topk(logits, min(k, stop - start), dim=1)
        merged_values = torch.cat([top_values, values], dim=1)
        merged_ids = torch.cat([top_ids, ids + start], dim=1)
        top_values, order = torch.topk(merged_values, k, dim=1)
        top_ids = torch.gather(merged_ids, 1, order)
        if reference_ids is not None and at_reference is not None:
            hit = (reference_ids >= start) & (reference_ids < stop)
            rows_hit, cols_hit = torch.nonzero(hit, as_tuple=True)
            at_reference[rows_hit, cols_hit] = block[rows_hit, reference_ids[rows_hit, cols_hit] - start]
    log_normalizer = running_max + torch.log(running_sum)
    nll = log_normalizer - target_logit
    top_logprobs = (top_values.double() - log_normalizer[:, None]).float()
    if at_reference is not None:
        at_reference = at_reference - log_normalizer[:, None]
    return nll, top_ids[:, 0].clone(), top_ids, top_logprobs, at_reference


def walk_scores(path: Path, windows: torch.Tensor, top_k: int = 64, reference: TokenScores | None = None,
                on_layer: Callable[[int, int], None] | None = None, device: torch.device | str = "cpu") -> TokenScores:
    """Walk `path` layer by layer over the windows on `device`; per-token scores (see the module docstring)."""
    recorder = RoutingRecorder()
    stream = LayerStream(Checkpoint.open(path), recorder, device)
    layers = stream.config.num_hidden_layers
    inputs, targets = windows[:, :-1], windows[:, 1:].reshape(-1).to(stream.device)
    hidden = stream.start(inputs)
    with torch.inference_mode():
        for layer in range(layers):
            if on_layer is not None:
                on_layer(layer, layers)
            hidden = stream.layer(layer, hidden)
        reference_ids = reference.top_ids.to(stream.device) if reference is not None else None
        scores = _head_scores(stream, hidden.main.reshape(-1, hidden.main.shape[-1]), targets, top_k, reference_ids)
    nll, argmax, top_ids, top_logprobs, at_reference = (None if t is None else t.cpu() for t in scores)
    return TokenScores(windows, nll, argmax, top_ids, top_logprobs, recorder.chosen,
                       None if at_reference is None else at_reference.float())


def topk_kl(reference: TokenScores, candidate_at_reference: torch.Tensor) -> torch.Tensor:
    """Per-token KL(ref || candidate) over the reference's top-k plus one bucket for the rest."""
    p_log = reference.top_logprobs.double()
    q_log = candidate_at_reference.double()
    p, q = p_log.exp(), q_log.exp()
    head = (p * (p_log - q_log)).sum(dim=1)
    p_rest = (1.0 - p.sum(dim=1)).clamp_min(0.0)
    q_rest = (1.0 - q.sum(dim=1)).clamp_min(1e-300)
    tail = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(1e-300)) - torch.log(q_rest)), 0.0)
    return (head + tail).clamp_min(0.0)


def walked_comparison(candidate: TokenScores, reference: TokenScores | None, experts: int) -> Comparison:
    """The same Comparison the resident path produces, from walked per-token scores."""
    count, length = candidate.windows.shape
    scored = length - 1
    window_nll = candidate.nll.view(count, scored).mean(dim=1)
    layers = sorted(candidate.routing)
    counts = torch.stack([torch.bincount(candidate.routing[layer].reshape(-1), minlength=experts) for layer in layers]) \
        if layers else torch.zeros(0, experts, dtype=torch.int64)
    result = Comparison(windows=count, tokens_scored=count * scored,
                        perplexity=perplexity_with_interval(window_nll, scored), window_nll=window_nll,
                        moe_layers=layers, expert_counts=counts)
    if reference is None:
        return result
    if not torch.equal(reference.windows, candidate.windows):
        raise ScoutqError("the reference was scored on different evaluation tokens (dataset, seq-len or samples differ)")
    assert candidate.at_reference is not None
    ref_nll = reference.nll.view(count, scored).mean(dim=1)
    result.reference_perplexity = perplexity_with_interval(ref_nll, scored)
    result.reference_window_nll = ref_nll
    result.reference_expert_counts = torch.stack(
        [torch.bincount(reference.routing[layer].reshape(-1), minlength=experts) for layer in layers]) if layers else None
    result.kl = summarize_kl(topk_kl(reference, candidate.at_reference), window=scored)
    result.top1_agreement = float((candidate.argmax == reference.argmax).double().mean())
    result.routing_agreement = {
        layer: float((torch.sort(candidate.routing[layer], dim=1).values
                      == torch.sort(reference.routing[layer], dim=1).values).all(dim=1).double().mean())
        for layer in layers}
    return result


def save_reference(scores: TokenScores, path: Path, description: dict[str, object]) -> None:
    """Store a walked reference's per-token scores for later candidates (safetensors + JSON metadata)."""
    tensors = {"windows": scores.windows, "nll": scores.nll, "argmax": scores.argmax, "top_ids": scores.top_ids,
               "top_logprobs": scores.top_logprobs}
    tensors |= {f"routing.{layer}": chosen.contiguous() for layer, chosen in scores.routing.items()}
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={"format": REFERENCE_FORMAT, "description": json.dumps(description)})


def load_reference(path: Path) -> tuple[TokenScores, dict[str, object]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != REFERENCE_FORMAT:
                raise ScoutqError(f"{path}: not a stored scoutq reference (format {metadata.get('format')!r})")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
    except ScoutqError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ScoutqError(f"{path}: cannot read the stored reference ({err})") from None
    routing = {int(name.split(".", 1)[1]): tensor for name, tensor in tensors.items() if name.startswith("routing.")}
    scores = TokenScores(tensors["windows"], tensors["nll"], tensors["argmax"], tensors["top_ids"],
                         tensors["top_logprobs"], routing)
    return scores, json.loads(str(metadata.get("description", "{}")))
