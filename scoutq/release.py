"""Release artifacts: quantize one source with several recipes, evaluate each, checksum it all.

    python -m scoutq.release --src CKPT --recipes "w4a16-g128 w4a16-g128-gptq" --dist dist [--eval-samples N]

dist/ then holds, per recipe, the quantized checkpoint directory `<source>-<recipe>/` (with its
scoutq-manifest.json and, when calibrated, coverage.json), its eval report
`<source>-<recipe>.eval.json` and `.eval.md` (against the source), and one `SHA256SUMS` over
every file in dist/ (the `sha256sum -c` format, paths relative to dist/). `make release` and the
release workflow call this. Each step is a scoutq CLI command, so a release is exactly what a
user running those commands would get.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scoutq.checkpoint.hashing import file_sha256
from scoutq.checkpoint.writer import atomic_write_bytes
from scoutq.cli.app import main as scoutq
from scoutq.errors import ScoutqError


def _run(argv: list[str]) -> None:
    try:
        scoutq(argv)
    except SystemExit as done:
        if done.code not in (0, None):
            raise SystemExit(f"scoutq {' '.join(argv)} failed with exit code {done.code}") from None


def sha256sums(dist: Path) -> str:
    lines = []
    for path in sorted(p for p in dist.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{file_sha256(path)}  {path.relative_to(dist).as_posix()}")
    return "\n".join(lines) + "\n"


def release(src: Path, recipes: list[str], dist: Path, eval_samples: int | None, seq_len: int) -> None:
    if not recipes:
        raise ScoutqError("no recipes given (RECIPES=\"w4a16-g128 ...\")")
    dist.mkdir(parents=True, exist_ok=True)
    stem = src.resolve().name
    for recipe in recipes:
        name = f"{stem}-{Path(recipe).stem}"
        out = dist / name
        _run(["quantize", str(src), "--recipe", recipe, "--out", str(out), "--overwrite"])
        _run(["verify", str(out)])
        evaluation = ["eval", str(out), "--reference", str(src), "--seq-len", str(seq_len),
                      "--json", str(dist / f"{name}.eval.json"), "--markdown", str(dist / f"{name}.eval.md")]
        if eval_samples is not None:
            evaluation += ["--samples", str(eval_samples)]
        _run(evaluation)
    atomic_write_bytes(dist / "SHA256SUMS", sha256sums(dist).encode("utf-8"))
    print(f"release artifacts in {dist}: {len(recipes)} checkpoint(s), eval reports, SHA256SUMS")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="source checkpoint directory")
    parser.add_argument("--recipes", required=True, help="space-separated recipe names or files")
    parser.add_argument("--dist", type=Path, default=Path("dist"))
    parser.add_argument("--eval-samples", type=int, default=None, help="evaluation windows (default: all)")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        release(args.src, args.recipes.split(), args.dist, args.eval_samples, args.seq_len)
    except ScoutqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
