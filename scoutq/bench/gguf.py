"""GGUF quality (issue 19): scoutq's Q4_0 / Q4_K files beside llama.cpp's own, on tiny-trained.

    python -m scoutq.bench.gguf [--dir DIR] [--calibration builtin-train]

scoutq writes gguf-bf16, gguf-q4_0 (round-to-nearest), gguf-q4_0-gptq, gguf-q4_0-gptaq and
gguf-q4_k; llama.cpp's quantizer (llama-cpp-python's `llama_model_quantize`, the code behind
`llama-quantize`) makes Q4_0 and Q4_K_M from scoutq's BF16 GGUF, twice each: with its defaults
(token embedding Q4_0 / Q4_K, output head Q6_K) and with the token embedding and output head kept
in BF16 as scoutq's recipes keep them, so that the second pair quantizes exactly the tensors
scoutq's files quantize (attention, routed and shared experts; router and norms F32 in all).
Every file is then scored by one `scoutq eval FILE --reference tiny-trained` on the held-out
builtin evaluation split (every 128-token window), in fp32. The table gives file size, mean KL
to bf16 with its interval, top-1 agreement, the perplexity gap, and each KL as a ratio to
llama.cpp's coverage-matched Q4_0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

from scoutq.bench._fixtures import fixture, scoutq_command

SCOUTQ_FILES = [("scoutq", "Q4_0 round-to-nearest", "gguf-q4_0"), ("scoutq", "Q4_0 GPTQ", "gguf-q4_0-gptq"),
                ("scoutq", "Q4_0 GPTAQ", "gguf-q4_0-gptaq"), ("scoutq", "Q4_K round-to-nearest", "gguf-q4_k")]
GGML_TYPE_BF16 = 30


def llama_cpp_quantize(source: Path, out: Path, ftype: str, keep_embeddings: bool) -> None:
    """llama.cpp's quantizer on a BF16 GGUF (what `llama-quantize SOURCE OUT TYPE` does)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    llama_cpp.llama_log_set(silent, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if keep_embeddings:
        params.token_embedding_type = GGML_TYPE_BF16
        params.output_tensor_type = GGML_TYPE_BF16
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama.cpp's quantizer failed on {source} -> {ftype} (code {code})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(".cache/scoutq/tiny-trained"))
    parser.add_argument("--dir", type=Path, default=Path(".cache/scoutq/bench-gguf"))
    parser.add_argument("--calibration", default="builtin-train", help="calibration set of the calibrated files")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    scoutq = scoutq_command()
    fixture(scoutq, args.source, "tiny-trained")
    args.dir.mkdir(parents=True, exist_ok=True)

    def quantize(recipe: str, *extra: str) -> Path:
        out = args.dir / f"{recipe}.gguf"
        subprocess.run([scoutq, "quantize", str(args.source), "--recipe", recipe, "--out", str(out), *extra],
                       check=True, stdout=subprocess.DEVNULL)
        return out

    bf16 = quantize("gguf-bf16")
    files = []
    for tool, what, recipe in SCOUTQ_FILES:
        calibrated = recipe.endswith(("gptq", "gptaq"))
        files.append((tool, what, quantize(recipe, *(["--calibration", args.calibration] if calibrated else []))))
    for ftype, what in (("Q4_0", "Q4_0"), ("Q4_K_M", "Q4_K_M")):
        for keep, how in ((True, "embedding and head BF16, as scoutq"), (False, "its defaults")):
            out = args.dir / f"llama.cpp-{ftype}{'-bf16-ends' if keep else ''}.gguf"
            llama_cpp_quantize(bf16, out, ftype, keep)
            files.append(("llama.cpp", f"{what} ({how})", out))

    rows = []
    for tool, what, path in files:
        report = path.with_suffix(".eval.json")
        subprocess.run([scoutq, "eval", str(path), "--reference", str(args.source), "--json", str(report)],
                       check=True, stdout=subprocess.DEVNULL)
        body = json.loads(report.read_text())
        rows.append({"tool": tool, "file": what, "path": str(path), "mib": path.stat().st_size / 2**20,
                     "windows": body["dataset"]["windows"], "kl_mean": body["kl"]["mean"],
                     "kl_low": body["kl"]["mean_low"], "kl_high": body["kl"]["mean_high"],
                     "top1": body["top1_agreement"], "gap_pct": body["perplexity_gap_pct"]})
    baseline = next(r for r in rows if r["tool"] == "llama.cpp" and r["file"].startswith("Q4_0 (embedding"))
    print(f"tiny-trained, held-out builtin evaluation split: {rows[0]['windows']} windows x 128 tokens; "
          f"calibration {args.calibration}; KL ratios to llama.cpp's coverage-matched Q4_0")
    print("| tool | file | size MiB | mean KL [95%] | KL / llama.cpp Q4_0 | top-1 | perplexity gap |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['file']} | {r['mib']:.2f} | {r['kl_mean']:.5f} [{r['kl_low']:.5f}, {r['kl_high']:.5f}] "
              f"| {r['kl_mean'] / baseline['kl_mean']:.3f} | {100 * r['top1']:.2f}% | {r['gap_pct']:+.3f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
