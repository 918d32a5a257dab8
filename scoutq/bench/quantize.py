"""Quantization throughput and memory on real-Scout-shape layers, against a plain read.

    python -m scoutq.bench.quantize --layers 1 --layers 3 [--recipe w4a16-g128] [--dir .cache/scoutq/bench]

For each fixture size it measures, in one run and on the same files:
  * plain read: every byte of every shard read into a reused 64 MB buffer;
  * safetensors load: `safe_open(...).get_tensor` of every tensor;
  * `scoutq quantize` in a fresh process: wall time, GB/s of bf16 input, peak RSS.
Figures are printed as a table and as JSON (--json). Nothing is asserted: targets are read off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scoutq.bench._fixtures import scout_layers, scoutq_command


def plain_read(files: list[Path]) -> tuple[int, float]:
    buffer = bytearray(64 * 1024 * 1024)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while count := handle.readinto(view):
                total += count
    return total, time.perf_counter() - start


def safetensors_load(files: list[Path]) -> tuple[int, float]:
    from safetensors import safe_open

    total, start = 0, time.perf_counter()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                # get_tensor maps the file lazily; the copy makes it actually read the bytes.
                tensor = handle.get_tensor(key).clone()
                total += tensor.numel() * tensor.element_size()
                del tensor
    return total, time.perf_counter() - start


def bench_one(scoutq: str, directory: Path, layers: int, recipe: str, workers: int) -> dict[str, object]:
    source = scout_layers(scoutq, directory, layers)
    shards = sorted(source.glob("*.safetensors"))
    read_bytes, read_seconds = plain_read(shards)
    load_bytes, load_seconds = safetensors_load(shards)
    out = directory / f"scout-layers-{layers}-{recipe}"
    shutil.rmtree(out, ignore_errors=True)
    # A child process per measurement: ru_maxrss is a per-process high-water mark.
    probe = [sys.executable, "-m", "scoutq.bench.peak_rss", "--", scoutq, "quantize", str(source),
             "--recipe", recipe, "--out", str(out), "--workers", str(workers)]
    result = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    quant_gbs = read_bytes / 1e9 / result["seconds"]
    return {
        "layers": layers,
        "recipe": recipe,
        "input_gb": round(read_bytes / 1e9, 3),
        "plain_read_gb_s": round(read_bytes / 1e9 / read_seconds, 3),
        "safetensors_load_gb_s": round(load_bytes / 1e9 / load_seconds, 3),
        "quantize_seconds": result["seconds"],
        "quantize_gb_s": round(quant_gbs, 3),
        "ratio_to_plain_read": round(quant_gbs / (read_bytes / 1e9 / read_seconds), 3),
        "ratio_to_safetensors_load": round(quant_gbs / (load_bytes / 1e9 / load_seconds), 3),
        "quantize_peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3),
        "output_gb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e9, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, action="append", help="fixture sizes (repeatable; default 1)")
    parser.add_argument("--recipe", default="w4a16-g128")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(".cache/scoutq/bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    scoutq = scoutq_command()
    rows = [bench_one(scoutq, args.dir, layers, args.recipe, args.workers) for layers in (args.layers or [1])]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cpu cores: {os.cpu_count()}  recipe: {args.recipe}  workers: {args.workers}")
    header = ["layers", "input GB", "plain read GB/s", "st load GB/s", "quantize s", "quantize GB/s",
              "x plain read", "x st load", "peak RSS GB", "output GB"]
    keys = ["layers", "input_gb", "plain_read_gb_s", "safetensors_load_gb_s", "quantize_seconds", "quantize_gb_s",
            "ratio_to_plain_read", "ratio_to_safetensors_load", "quantize_peak_rss_gb", "output_gb"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
