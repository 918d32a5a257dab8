"""The calibrated layer walk with 1 and N ranks on the CPU (`make bench-distributed`).

    python -m scoutq.bench.distributed [--layers 2] [--samples 32] [--seq-len 512] [--ranks 1 --ranks 2]

For each rank count, `scoutq quantize --nproc N` of the scout-layers fixture in a fresh process:
wall time, speed-up over one rank, the largest process's peak RSS (getrusage over the launcher's
children: every rank is a child, so this is the peak of the largest rank) and the sha256 of the
output (equal for every N). The projected time of the full 48-layer Scout scales the measured
per-layer time. Every rank keeps torch's default thread count (byte-identity needs it), so on a
machine with fewer cores than ranks x threads the ranks share the cores: the speed-up measured
here is that of this machine, not of one GPU per rank.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from scoutq.bench._fixtures import scout_layers, scoutq_command, walk_arguments

SCOUT_LAYERS = 48


def _run(scoutq: str, source: Path, out: Path, args: object, ranks: int) -> dict[str, object]:
    command = [scoutq, "quantize", str(source), "--recipe", args.recipe, "--out", str(out),  # type: ignore[attr-defined]
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite",  # type: ignore[attr-defined]
               "--nproc", str(ranks)]
    probe = subprocess.run([sys.executable, "-m", "scoutq.bench.peak_rss", "--", *command], capture_output=True,
                           text=True, check=False)
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    digest = "failed"
    if measured["exit_code"] == 0:  # every shard, in name order (real-shape outputs are sharded)
        hasher = hashlib.sha256()
        for shard in sorted(out.glob("*.safetensors")):
            hasher.update(shard.read_bytes())
        digest = hasher.hexdigest()[:16]
    return {"ranks": ranks, "seconds": measured["seconds"], "peak_rss_gb": round(measured["peak_rss_bytes"] / 1e9, 2),
            "sha256": digest}


def main(argv: list[str] | None = None) -> int:
    parser = walk_arguments(__doc__, layers=2, samples=32, recipe="w4a16-g128-gptq")
    parser.add_argument("--ranks", type=int, action="append", help="rank counts to run (default 1 and 2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    scoutq = scoutq_command()
    source = scout_layers(scoutq, args.dir, args.layers)
    rows = [_run(scoutq, source, args.dir / f"{source.name}-{args.recipe}-ranks{n}", args, n)
            for n in (args.ranks or [1, 2])]
    base = float(rows[0]["seconds"])  # type: ignore[arg-type]
    print(f"calibrated walk ({args.recipe}, {args.samples} x {args.seq_len} tokens) on {source.name}")
    print(f"{'ranks':>5s} {'seconds':>9s} {'speed-up':>9s} {'peak RSS GB':>12s} {'48 layers, h':>13s}  sha256")
    for row in rows:
        seconds = float(row["seconds"])  # type: ignore[arg-type]
        projected = seconds / args.layers * SCOUT_LAYERS / 3600
        row |= {"speed_up": round(base / seconds, 2), "projected_48_layers_hours": round(projected, 1)}
        print(f"{row['ranks']!s:>5s} {seconds:9.1f} {row['speed_up']!s:>9s} {row['peak_rss_gb']!s:>12s} "
              f"{projected:13.1f}  {row['sha256']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["sha256"] == rows[0]["sha256"] != "failed" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
