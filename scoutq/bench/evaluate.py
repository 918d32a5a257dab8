"""Memory and time of the layer-walked eval on real-Scout-shape layers.

    python -m scoutq.bench.evaluate [--layers 3] [--samples 8] [--seq-len 512]

Builds (or reuses) the `scout-layers` fixture and its w4a16-g128 quantization, then runs, each
in a fresh process, `scoutq eval QUANTIZED --reference SOURCE --layer-walk`: both models are
walked one layer at a time, lm_head in row blocks. Prints wall time, peak RSS and the report's
headline numbers. Nothing is asserted (target: peak RSS at most 6 GB for 3 layers).
"""

from __future__ import annotations

import json
import subprocess
import sys

from scoutq.bench._fixtures import scout_layers, scoutq_command, walk_arguments


def main(argv: list[str] | None = None) -> int:
    parser = walk_arguments(__doc__, layers=3, samples=8, recipe="w4a16-g128")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    scoutq = scoutq_command()
    source = scout_layers(scoutq, args.dir, args.layers)
    quantized = args.dir / f"scout-layers-{args.layers}-{args.recipe}"
    if subprocess.run([scoutq, "verify", str(quantized)], capture_output=True).returncode != 0:
        subprocess.run([scoutq, "quantize", str(source), "--recipe", args.recipe, "--out", str(quantized),
                        "--overwrite"], check=True)
    report = args.dir / f"eval-walked-{args.layers}.json"
    probe = [sys.executable, "-m", "scoutq.bench.peak_rss", "--", scoutq, "eval", str(quantized), "--reference",
             str(source), "--layer-walk", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
             "--json", str(report)]
    measured = json.loads(subprocess.run(probe, stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
                          .splitlines()[-1])
    body = json.loads(report.read_text()) if report.is_file() else {}
    print(json.dumps({
        "layers": args.layers,
        "tokens": args.samples * args.seq_len,
        "exit_code": measured["exit_code"],
        "seconds": measured["seconds"],
        "peak_rss_gb": round(measured["peak_rss_bytes"] / 1e9, 3),
        "perplexity": body.get("perplexity"),
        "reference_perplexity": body.get("reference_perplexity"),
        "kl_mean": (body.get("kl") or {}).get("mean"),
        "top1_agreement": body.get("top1_agreement"),
        "routing_agreement": [entry["agreement"] for entry in body.get("routing", [])],
    }, indent=2))
    return int(measured["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
