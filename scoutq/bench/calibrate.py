"""Memory and time of a calibrated quantization (the layer walk) on real-Scout-shape layers.

    python -m scoutq.bench.calibrate [--layers 2] [--samples 32] [--seq-len 512] [--recipe w4a16-g128-gptq]

Builds (or reuses) the `scout-layers` fixture, then runs `scoutq quantize` with the calibrated
recipe in a fresh process and reports its wall time and peak RSS, beside what the walk must
hold: the hidden states of the calibration set, one layer's weights without its routed experts,
one expert's weights, and one expert projection's Hessian. Nothing is asserted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from scoutq.bench._fixtures import scout_layers, scoutq_command, walk_arguments
from scoutq.calibrate.estimate import estimate_calibration_memory
from scoutq.checkpoint.config import load_text_config
from scoutq.quant.recipe import GptqSettings, load_recipe


def budget(source: Path, tokens: int, gptq: GptqSettings | None = None) -> dict[str, float]:
    """The issue's bound, in GB: hidden states + one layer's non-expert weights + one expert + its statistics."""
    config = load_text_config(source)
    hidden, width = config.hidden_size, config.intermediate_size
    attention = hidden * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    non_expert = (attention + 3 * hidden * width + config.num_local_experts * hidden) * 2  # bf16 as stored
    return {
        "hidden_states_gb": tokens * hidden * 4 / 1e9,
        "layer_weights_without_experts_gb": non_expert / 1e9,
        "one_expert_gb": 3 * hidden * width * 2 / 1e9,
        "one_expert_hessians_gb": (hidden * hidden + width * width) * 4 / 1e9,
        "estimate_gb": estimate_calibration_memory(config, tokens, all_experts=False, gptq=gptq) / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = walk_arguments(__doc__, layers=2, samples=32, recipe="w4a16-g128-gptq")
    parser.add_argument("--keep", action="store_true", help="keep the quantized output")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    scoutq = scoutq_command()
    source = scout_layers(scoutq, args.dir, args.layers)
    out = args.dir / f"scout-layers-{args.layers}-{args.recipe}"
    shutil.rmtree(out, ignore_errors=True)
    # Progress bars go to stderr, which stays on the terminal; peak_rss prints one JSON line.
    probe = [sys.executable, "-m", "scoutq.bench.peak_rss", "--", scoutq, "quantize", str(source), "--recipe",
             args.recipe, "--out", str(out), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    result = json.loads(subprocess.run(probe, stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
                        .splitlines()[-1])
    coverage = json.loads((out / "coverage.json").read_text()) if (out / "coverage.json").is_file() else None
    tokens = args.samples * args.seq_len
    report = {
        "layers": args.layers,
        "recipe": args.recipe,
        "tokens": tokens,
        "exit_code": result["exit_code"],
        "seconds": result["seconds"],
        "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3),
        **{key: round(value, 3) for key, value in budget(source, tokens, load_recipe(args.recipe).gptq).items()},
        "experts_below_min_tokens": len(coverage["below_min_tokens"]) if coverage else None,
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
