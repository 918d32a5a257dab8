"""The streamed GGUF export on real-Scout-shape layers: wall time, peak RSS, output size.

    python -m scoutq.bench.gguf_export --layers 2 [--recipe gguf-q4_0 --recipe gguf-q4_k]

Builds (or reuses) `scout-layers --layers N` and runs `scoutq quantize ... --recipe R --out
X.gguf` for each recipe in its own process under scoutq.bench.peak_rss (the kernel's high-water
mark of the finished child). Target: at most 1.5 GB of peak RSS on 2 layers, whatever the model
size, since one expert's projection or one row block is in memory at a time. Needs about 20 GB of
disk (the fixture plus the files).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from scoutq.bench._fixtures import scout_layers, scoutq_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--recipe", action="append", help="gguf recipes (repeatable; default gguf-q4_0, gguf-q4_k)")
    parser.add_argument("--dir", type=Path, default=Path(".cache/scoutq/bench"))
    parser.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = parser.parse_args(argv)
    scoutq = scoutq_command()
    source = scout_layers(scoutq, args.dir, args.layers)
    rows = []
    for recipe in args.recipe or ["gguf-q4_0", "gguf-q4_k"]:
        out = args.dir / f"scout-layers-{args.layers}-{recipe}.gguf"
        out.unlink(missing_ok=True)
        probe = [sys.executable, "-m", "scoutq.bench.peak_rss", "--", scoutq, "quantize", str(source), "--recipe",
                 recipe, "--out", str(out)]
        result = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        if result["exit_code"] != 0:
            raise SystemExit(f"quantize {recipe} failed (exit {result['exit_code']})")
        rows.append({"layers": args.layers, "recipe": recipe, "seconds": result["seconds"],
                     "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3),
                     "output_gb": round(out.stat().st_size / 1e9, 3)})
        if not args.keep:
            out.unlink()
    print("| layers | recipe | seconds | peak RSS | GGUF size |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layers']} | {row['recipe']} | {row['seconds']:.1f} | {row['peak_rss_gb']:.3f} GB | "
              f"{row['output_gb']:.3f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
