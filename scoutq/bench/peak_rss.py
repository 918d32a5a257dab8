"""Wall time and peak resident memory of scoutq commands, each run in a fresh process.

    python -m scoutq.bench.peak_rss -- scoutq inspect /data/scout-1

Peak RSS comes from the kernel's accounting of the finished child (getrusage), so it counts
everything the command touched, torch's own allocations included. Not psutil: it reports a
process's resident set now (a high-water mark only on Windows), and nothing once the child has
exited; sampling it while the child runs would miss short peaks.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def measure(command: list[str]) -> dict[str, float | int | str]:
    """Run a command to completion; return its exit code, seconds and peak RSS in bytes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before and before:
        # ru_maxrss over children is a running maximum: a smaller child is hidden by an earlier one.
        raise RuntimeError("measure() must be the first child of its process; run one command per invocation")
    return {"command": " ".join(command), "exit_code": completed.returncode, "seconds": round(seconds, 2),
            "peak_rss_bytes": peak_kib * 1024}


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    result = measure(argv)
    print(json.dumps(result))
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
