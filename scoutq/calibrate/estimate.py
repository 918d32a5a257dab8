"""Memory estimates behind `scoutq quantize --dry-run` and the benchmarks: arithmetic on the config.

RUNTIME_BASE_BYTES is the resident memory of the runtime alone, the base every estimate adds to
(pipeline.quantize's streaming estimate as well as the layer walk's here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scoutq.checkpoint.config import TextConfig
    from scoutq.quant.recipe import GptqSettings

RUNTIME_BASE_BYTES = 450 * 1024 * 1024  # Python, torch and the thread pool, measured idle


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
