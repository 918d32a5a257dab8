"""The calibrated layer walk with 1 and N ranks on the CPU (`make bench-distributed`).

    python -m scoutq.bench.distributed [--layers 2] [--samples 32] [--seq-len 512] [--ranks 1 --ranks 2]

For each rank count, `scoutq quantize` of the scout-layers fixture as N ranks, each started with
the environment torchrun (or `--nproc`) gives it and wrapped by scoutq.bench.peak_rss: wall
time, speed-up over one rank, every rank's peak RSS (the kernel's high-water mark of that
process), their sum (an upper bound of the total at any one moment) and the sha256 of the
output (equal for every N). The projected time of the full 48-layer Scout scales the measured
per-layer time. Byte-identity needs the same thread count in every process, so every run gets
OMP_NUM_THREADS = cores / (largest rank count) (`--threads` to choose): one rank then uses a
share of the machine, not all of it, and the speed-up is that of adding ranks on free cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scoutq.bench._fixtures import scout_layers, scoutq_command, walk_arguments
from scoutq.checkpoint.reader import Checkpoint
from scoutq.stream.processes import free_port, rank_environment

SCOUT_LAYERS = 48


def _run(scoutq: str, source: Path, out: Path, args: object, ranks: int) -> dict[str, object]:
    command = [scoutq, "quantize", str(source), "--recipe", args.recipe, "--out", str(out),  # type: ignore[attr-defined]
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite"]  # type: ignore[attr-defined]
    base = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # type: ignore[attr-defined]
    port = free_port()
    started = time.perf_counter()
    probes = [subprocess.Popen([sys.executable, "-m", "scoutq.bench.peak_rss", "--", *command],
                               env={**base, **rank_environment(rank, ranks, port)}, stdout=subprocess.PIPE,
                               text=True) for rank in range(ranks)]
    measured = [json.loads(probe.communicate()[0].strip().splitlines()[-1]) for probe in probes]
    seconds = time.perf_counter() - started
    digest = "failed"
    if all(m["exit_code"] == 0 for m in measured):  # every shard, in name order (real-shape outputs are sharded)
        hasher = hashlib.sha256()
        for shard in sorted(out.glob("*.safetensors")):
            hasher.update(shard.read_bytes())
        digest = hasher.hexdigest()[:16]
    per_rank = [round(m["peak_rss_bytes"] / 1e9, 2) for m in measured]
    return {"ranks": ranks, "seconds": round(seconds, 1), "peak_rss_gb_per_rank": per_rank,
            "peak_rss_gb_sum": round(sum(per_rank), 2), "sha256": digest}


def _amdahl(rows: list[dict[str, object]]) -> tuple[float, float]:
    """Least-squares serial and parallel seconds of T(N) = serial + parallel / N."""
    x = [1 / int(row["ranks"]) for row in rows]  # type: ignore[call-overload]
    y = [float(row["seconds"]) for row in rows]  # type: ignore[arg-type]
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    parallel = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True)) / sum((a - mean_x) ** 2 for a in x)
    return mean_y - parallel * mean_x, parallel


def main(argv: list[str] | None = None) -> int:
    parser = walk_arguments(__doc__, layers=2, samples=32, recipe="w4a16-g128-gptq")
    parser.add_argument("--ranks", type=int, action="append", help="rank counts to run (default 1 and 2)")
    parser.add_argument("--source", type=Path, help="walk this checkpoint instead of the scout-layers fixture")
    parser.add_argument("--threads", type=int, help="threads per rank (default: cores / the largest rank count)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    counts = args.ranks or [1, 2]
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(counts))
    args.dir.mkdir(parents=True, exist_ok=True)
    scoutq = scoutq_command()
    source = args.source or scout_layers(scoutq, args.dir, args.layers)
    layers = Checkpoint.open(source).config.num_hidden_layers
    rows = [_run(scoutq, source, args.dir / f"{source.name}-{args.recipe}-ranks{n}", args, n)
            for n in counts]
    base = float(rows[0]["seconds"])  # type: ignore[arg-type]
    print(f"calibrated walk ({args.recipe}, {args.samples} x {args.seq_len} tokens) on {source.name}, "
          f"{args.threads} threads per rank")
    print(f"{'ranks':>5s} {'seconds':>9s} {'speed-up':>9s} {'peak RSS GB per rank':>22s} {'sum GB':>7s} "
          f"{'48 layers, h':>13s}  sha256")
    for row in rows:
        seconds = float(row["seconds"])  # type: ignore[arg-type]
        projected = seconds / layers * SCOUT_LAYERS / 3600
        row |= {"speed_up": round(base / seconds, 2), "projected_48_layers_hours": round(projected, 1)}
        per_rank = " ".join(f"{gb:.2f}" for gb in row["peak_rss_gb_per_rank"])  # type: ignore[attr-defined]
        print(f"{row['ranks']!s:>5s} {seconds:9.1f} {row['speed_up']!s:>9s} {per_rank:>22s} "
              f"{row['peak_rss_gb_sum']!s:>7s} {projected:13.1f}  {row['sha256']}")
    if len(rows) >= 2:
        serial, parallel = _amdahl(rows)
        print(f"fit T(N) = {serial:.0f} s + {parallel:.0f} s / N over the measured runs; 48 layers (an upper "
              "bound: the run's fixed costs, writing the output included, are counted once per layer):")
        for ranks in (1, 4, 8):
            print(f"  {ranks} ranks: {(serial + parallel / ranks) / layers * SCOUT_LAYERS / 3600:.1f} h")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["sha256"] == rows[0]["sha256"] != "failed" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
