"""What a lent GPU machine runs in one go (`make bench-gpu`), printing one table at the end.

    python -m scoutq.bench.gpu [--layers 2] [--samples 32] [--seq-len 512] [--dir .cache/scoutq/bench]
    python -m scoutq.bench.gpu --tiny --device cpu      # the same steps on the tiny fixture (a smoke run)

Steps, each a fresh `scoutq` process timed from outside (peak RSS from the kernel, peak_rss.py):
  1. the scout-layers fixture (real Scout shapes; reused when present);
  2. round-to-nearest quantize (w4a16-g128);
  3. the calibrated layer walk (w4a16-g128-gptq) on the device, with 1 rank and, when several
     GPUs are visible, with one rank per GPU; the sha256 of each output, so equal bytes show;
  4. the same walk on the CPU is NOT run at real shapes (hours); on --tiny it is, and the share
     of int4 codes that differ between CPU and device outputs is printed;
  5. `scoutq bench kernels`, `scoutq bench moe` and `scoutq bench moe --device cuda` (the grouped
     Triton MoE kernel; target: int4 one-token step >= 2.5x bf16);
  6. the GPU tests (`pytest -m gpu`).
Nothing is asserted here; the figures are read off the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scoutq.bench._fixtures import fixture, scout_layers, scoutq_command


def _timed(command: list[str], env: dict[str, str] | None = None) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in GB, last line of stderr) of a command in its own measuring
    process (peak_rss.py: getrusage over one child, so each step's peak is its own)."""
    probe = [sys.executable, "-m", "scoutq.bench.peak_rss", "--", *command]
    done = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    try:
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        measured = {"exit_code": done.returncode, "seconds": float("nan"), "peak_rss_bytes": 0}
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return (int(measured["exit_code"]), float(measured["seconds"]), measured["peak_rss_bytes"] / 1e9,
            lines[-1] if lines else "")


def _sha(directory: Path) -> str:
    digest = hashlib.sha256()
    for shard in sorted(directory.glob("*.safetensors")):
        digest.update(shard.read_bytes())
    return digest.hexdigest()[:16]


def _differing_codes(a: Path, b: Path) -> float:
    """Share of packed int4 words that differ between two outputs of the same plan."""
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    packed = [name for name in left if name.endswith("weight_packed")]
    total = sum(left[name].numel() for name in packed)
    differ = sum(int((left[name] != right[name]).sum()) for name in packed)
    return differ / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny fixture instead of real shapes (a smoke run)")
    parser.add_argument("--dir", type=Path, default=Path(".cache/scoutq/bench"))
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device is visible; nothing to measure (use --tiny --device cpu for a smoke run)")
        return 1
    gpus = torch.cuda.device_count() if args.device == "cuda" else 1
    scoutq = scoutq_command()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []

    def step(name: str, command: list[str], env: dict[str, str] | None = None, out: Path | None = None,
             show: bool = False) -> None:
        if show:  # a benchmark or test run whose own table is the result: printed as it runs
            begun = time.perf_counter()
            code, peak, last = subprocess.run(command, check=False).returncode, 0.0, "printed above"
            seconds = time.perf_counter() - begun
        else:
            code, seconds, peak, last = _timed(command, env)
        rows.append({"step": name, "exit": code, "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2),
                     "sha256": _sha(out) if out is not None and code == 0 else "", "note": last[:100]})
        print(f"{name}: exit {code}, {seconds:.1f} s", flush=True)

    started = time.perf_counter()
    if args.tiny:
        source = fixture(scoutq, args.dir / "tiny", "tiny")
    else:
        source = scout_layers(scoutq, args.dir, args.layers)
    rows.append({"step": f"fixture {source.name}", "exit": 0, "seconds": round(time.perf_counter() - started, 1),
                 "peak_rss_gb": 0.0, "sha256": "", "note": "reused when present"})
    walk = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite"]
    rtn = args.dir / f"{source.name}-rtn"
    step("quantize w4a16-g128 (RTN)", [scoutq, "quantize", str(source), "--recipe", "w4a16-g128", "--out", str(rtn),
                                        "--overwrite"], out=rtn)
    one = args.dir / f"{source.name}-gptq-{args.device}-1"
    step(f"calibrate w4a16-g128-gptq, {args.device}, 1 rank",
         [scoutq, "quantize", str(source), "--recipe", "w4a16-g128-gptq", "--out", str(one), "--device", args.device,
          *walk], out=one)
    if gpus > 1:
        many = args.dir / f"{source.name}-gptq-{args.device}-{gpus}"
        step(f"calibrate w4a16-g128-gptq, {args.device}, {gpus} ranks",
             [scoutq, "quantize", str(source), "--recipe", "w4a16-g128-gptq", "--out", str(many), "--device",
              args.device, "--nproc", str(gpus), *walk], out=many)
    if args.tiny and args.device != "cpu":
        cpu = args.dir / f"{source.name}-gptq-cpu-1"
        step("calibrate w4a16-g128-gptq, cpu, 1 rank",
             [scoutq, "quantize", str(source), "--recipe", "w4a16-g128-gptq", "--out", str(cpu), "--device", "cpu",
              *walk], out=cpu)
        rows[-1]["note"] = f"int4 words differing from {args.device}: {_differing_codes(one, cpu):.2%}"
    if not args.tiny:
        step("bench kernels", [scoutq, "bench", "kernels"], show=True)
        step("bench moe (cpu)", [scoutq, "bench", "moe"], show=True)
        step("bench moe --device cuda", [scoutq, "bench", "moe", "--device", "cuda"], show=True)
        step("tests -m gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], show=True)

    print(f"\nbench-gpu ({args.device}, {gpus} device(s), {time.perf_counter() - started:.0f} s in all)")
    print(f"{'step':48s} {'exit':>4s} {'seconds':>8s} {'peak GB':>8s}  {'sha256':16s}  note")
    for row in rows:
        print(f"{row['step']!s:48s} {row['exit']!s:>4s} {row['seconds']!s:>8s} {row['peak_rss_gb']!s:>8s}  "
              f"{row['sha256']!s:16s}  {row['note']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
