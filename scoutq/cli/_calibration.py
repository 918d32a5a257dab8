"""What `scoutq quantize` shows of a calibrated run: progress per layer and step, the coverage
summary, and the layer walk's memory estimate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scoutq.calibrate.job import LayerProgressFn
from scoutq.calibrate.walk import ProgressFn
from scoutq.cli._output import console, error_console, table
from scoutq.model.config import TextConfig
from scoutq.quant.recipe import GptqSettings

RUNTIME_BASE_BYTES = 450 * 1024 * 1024  # Python and torch, idle


@contextmanager
def calibration_progress(enabled: bool) -> Iterator[tuple[LayerProgressFn | None, ProgressFn | None]]:
    """Two bars on stderr: layers done, and the steps (attention, experts) inside the current layer."""
    if not enabled:
        yield None, None
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=error_console)
    layers = progress.add_task("calibrate: layers", total=None)
    steps = progress.add_task("layer", total=None)

    def on_layer(layer: int, total: int) -> None:
        progress.update(layers, completed=layer, total=total)

    def on_step(what: str, done: int, total: int) -> None:
        progress.update(steps, description=f"layer step: {what}", completed=done, total=total)
        if what == "done":
            task = progress.tasks[layers]
            progress.update(layers, completed=(task.completed or 0) + 1)

    with progress:
        yield on_layer, on_step


def coverage_summary(coverage: dict[str, Any]) -> None:
    """Per layer: routed tokens per expert (least, most) and the policies applied; a warning
    line for every expert below min_tokens."""
    rows = []
    for entry in coverage["layers"]:
        experts = entry["experts"]
        if not experts:
            continue
        routed = [e["routed_tokens"] for e in experts]
        policies = Counter(e["policy"] for e in experts)
        rows.append([str(entry["layer"]), str(entry["tokens"]), str(min(routed)), str(max(routed)),
                     ", ".join(f"{name} {count}" for name, count in sorted(policies.items()))])
    if rows:
        settings = coverage["settings"]
        table(f"Expert coverage ({settings['method']}, min_tokens {settings['min_tokens']}, "
              f"all_experts {settings['all_experts']})",
              ["layer", "tokens", "fewest routed", "most routed", "policies"], rows, right_align_from=1)
    for low in coverage["below_min_tokens"]:
        error_console.print(f"[yellow]warning:[/] layer {low['layer']} expert {low['expert']}: "
                            f"{low['routed_tokens']} routed tokens < min_tokens {coverage['settings']['min_tokens']}; "
                            f"applied {low['policy']}")
    for name in coverage["round_to_nearest_modules"][:3]:
        error_console.print(f"[yellow]note:[/] {name} is quantized by round-to-nearest (no calibration data reaches it)")
    console.print("coverage.json written beside the checkpoint")


def estimate_calibration_memory(config: TextConfig, tokens: int, all_experts: bool,
                                gptq: GptqSettings | None = None) -> int:
    """Estimate of the layer walk's peak RSS, in bytes (fp32 throughout).

    Hidden states and their per-layer copies (input, residual, normed, attention output,
    o_proj input), the widest intermediate activation (the shared expert's over all tokens,
    or an expert's over all tokens under all_experts), one layer's non-expert weights, one
    expert's three projections with their dequantized copies, GPTQ's working copies of the
    largest projection, the two Hessians and the temporaries of factorising the wider one
    (its dampened copy, the flipped copy, the Cholesky factor, its inverse and the identity
    it solves against). fp_target adds the reference stream's copies of the same activations,
    the X^T X_r matrices beside the Hessians, and the least-squares solve for the target weight
    (H's dampened copy, its Cholesky factor, the right-hand side and the solution, for the wider
    projection); router_aware the [D, D] output coupling.
    """
    fp_target = gptq is not None and gptq.fp_target
    router_aware = gptq is not None and gptq.router_weight > 0
    hidden = config.hidden_size
    dense = any(not config.is_moe_layer(layer) for layer in range(config.num_hidden_layers))
    width = max(config.intermediate_size, config.intermediate_size_mlp if dense else 0)
    attention_out = config.num_attention_heads * config.head_dim
    kv = 2 * config.num_key_value_heads * config.head_dim
    stream = tokens * (4 * hidden + attention_out) * 4 + tokens * width * 4  # one stream: hidden copies, intermediate
    activations = stream + tokens * width * 4  # the SwiGLU's second temporary
    if all_experts:
        activations += tokens * (hidden + width) * 4
    attention_weights = hidden * (2 * attention_out + kv)
    shared = 3 * hidden * width
    expert = 3 * hidden * width * 2  # source and dequantized
    gptq_work = 3 * hidden * width  # fp32 weight, its transposed copy, int8 codes (rounded up)
    hessians = hidden * hidden + width * width
    factorization = 5 * width * width
    if fp_target:
        activations += stream
        hessians *= 2
        factorization += 2 * width * width + 2 * hidden * width
    coupling = hidden * hidden if router_aware else 0
    weights = (attention_weights + shared + expert + gptq_work + hessians + factorization + coupling
               + config.num_local_experts * hidden) * 4
    return RUNTIME_BASE_BYTES + activations + weights
