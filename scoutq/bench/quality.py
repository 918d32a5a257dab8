"""The quality table of issue 5: bf16, RTN, clipping and GPTQ (int4 also GPTQ with full-precision
targets, GPTAQ, with and without router-aware rounding, and with and without signed scales;
and round-to-nearest with signed scales), int8 and int4, on tiny-trained.

    python -m scoutq.bench.quality [--calibration builtin-train] [--samples N] [--seq-len N]

Every calibrated method uses the same calibration set (default builtin-train, the most text
available offline; each recipe's own sample count and length unless given).

Quantizes the tiny-trained fixture with each method and bit width (the int8 clipping recipe
and the variants are written on the fly; the others are shipped), then runs `scoutq eval` of
each against the bf16 model on the held-out builtin evaluation split (every window of 128
tokens), in fp32 with the reference kernels, and prints one table: perplexity gap with its
interval (paired by window), mean KL with its interval, top-1 and minimum routing agreement,
and the ratios of the int4 gaps and KLs to RTN's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from scoutq.bench._fixtures import fixture, scoutq_command
from scoutq.quant.recipe import resolve_recipe_path

INT8_CLIP = """name: w8a16-clip
method: clip
rules:
  - targets: [routed_experts, shared_expert]
    weights: {bits: 8, symmetric: true}
calibration: {dataset: builtin, min_tokens: 32, fallback: all_experts}
"""
# Round-to-nearest with signed scales: the clipping search with only the full range to try
# (grid 1) picks exactly those scales; what the calibrated recipes' scale convention alone gives.
INT4_RTN_SIGNED = """name: w4a16-g128-rtn-signed
method: clip
rules:
  - targets: [routed_experts, shared_expert]
    weights: {bits: 4, group_size: 128, symmetric: true}
calibration: {dataset: builtin, samples: 8, seq_len: 64, all_experts: true}
clip: {grid: 1, signed_scales: true}
"""
CANDIDATES = [("int8", "RTN", "w8a16"), ("int8", "clip", "w8a16-clip"), ("int8", "GPTQ", "w8a16-gptq"),
              ("int4", "RTN", "w4a16-g128"), ("int4", "RTN, signed scales", "w4a16-g128-rtn-signed"),
              ("int4", "clip", "w4a16-g128-clip"), ("int4", "GPTQ", "w4a16-g128-gptq"),
              ("int4", "GPTAQ, router-blind", "w4a16-g128-gptaq-router-blind"),
              ("int4", "GPTAQ + router-aware, unsigned scales", "w4a16-g128-gptaq-unsigned"),
              ("int4", "GPTAQ + router-aware", "w4a16-g128-gptaq")]
UNCALIBRATED = ("RTN", "RTN, signed scales")  # rows that take no --calibration override


def gptaq_variant(recipe: Path, name: str, **gptq: object) -> str:
    """The shipped GPTAQ recipe with some gptq options changed: what each of them adds."""
    body = yaml.safe_load(recipe.read_text())
    body["name"] = name
    body["gptq"].update(gptq)
    return yaml.safe_dump(body, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(".cache/scoutq/tiny-trained"))
    parser.add_argument("--calibration", default="builtin-train", help="calibration set for every calibrated row")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (recipe default)")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (recipe default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    scoutq = scoutq_command()
    fixture(scoutq, args.source, "tiny-trained")
    rows = []
    with tempfile.TemporaryDirectory(prefix="scoutq-quality-") as scratch:
        work = Path(scratch)
        (work / "w8a16-clip.yaml").write_text(INT8_CLIP)
        (work / "w4a16-g128-rtn-signed.yaml").write_text(INT4_RTN_SIGNED)
        gptaq = resolve_recipe_path("w4a16-g128-gptaq")
        (work / "w4a16-g128-gptaq-router-blind.yaml").write_text(
            gptaq_variant(gptaq, "w4a16-g128-gptaq-router-blind", router_weight=0.0))
        (work / "w4a16-g128-gptaq-unsigned.yaml").write_text(
            gptaq_variant(gptaq, "w4a16-g128-gptaq-unsigned", signed_scales=False))
        for bits, method, recipe in CANDIDATES:
            recipe_arg = str(work / f"{recipe}.yaml") if (work / f"{recipe}.yaml").is_file() else recipe
            out = work / recipe
            command = [scoutq, "quantize", str(args.source), "--recipe", recipe_arg, "--out", str(out)]
            if method not in UNCALIBRATED:
                command += ["--calibration", args.calibration,*(["--samples", str(args.samples)] if args.samples else []),
                            *(["--seq-len", str(args.seq_len)] if args.seq_len else [])]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            report = work / f"{recipe}.json"
            subprocess.run([scoutq, "eval", str(out), "--reference", str(args.source), "--backend", "reference",
                            "--json", str(report)], check=True, stdout=subprocess.DEVNULL)
            body = json.loads(report.read_text())
            rows.append({"bits": bits, "method": method, "recipe": recipe, "windows": body["dataset"]["windows"],
                         "perplexity": body["perplexity"]["value"], "bf16_perplexity": body["reference_perplexity"]["value"],
                         "gap_pct": body["perplexity_gap_pct"], "gap_interval": body["perplexity_gap_interval_pct"],
                         "kl_mean": body["kl"]["mean"],
                         "kl_low": body["kl"]["mean_low"], "kl_high": body["kl"]["mean_high"],
                         "top1": body["top1_agreement"],
                         "routing_min": min(r["agreement"] for r in body["routing"])})
    rtn4 = next(r for r in rows if r["bits"] == "int4" and r["method"] == "RTN")
    print(f"held-out windows: {rows[0]['windows']} x 128 tokens; bf16 perplexity {rows[0]['bf16_perplexity']:.4f}; "
          f"calibration: {args.calibration}")
    print("| bits | method | perplexity | gap [95%, paired] | gap / RTN gap | mean KL [95%] | KL / RTN KL | top-1 | "
          "min routing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio_gap = r["gap_pct"] / rtn4["gap_pct"] if r["bits"] == "int4" else float("nan")
        ratio_kl = r["kl_mean"] / rtn4["kl_mean"] if r["bits"] == "int4" else float("nan")
        low, high = r["gap_interval"]
        print(f"| {r['bits']} | {r['method']} | {r['perplexity']:.4f} | {r['gap_pct']:+.3f}% [{low:+.3f}, {high:+.3f}] | "
              f"{ratio_gap:.3f} | "
              f"{r['kl_mean']:.5f} [{r['kl_low']:.5f}, {r['kl_high']:.5f}] | {ratio_kl:.3f} | {100 * r['top1']:.2f}% | "
              f"{100 * r['routing_min']:.2f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
