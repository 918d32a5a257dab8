"""The processes that walk the layer stream together: torch.distributed, joined through accelerate.

A multi-process run (`torchrun --nproc-per-node N -m scoutq ...`, or scoutq's own `--nproc N`,
which starts the same processes itself) splits the calibration windows between the ranks
(`Ranks.share`), and every rank walks its own windows through the same layers in lockstep. Each
module of a layer has one owner rank (`Ranks.owners`): the owner gathers the module's inputs
from every rank in window order, so it holds exactly the rows a single process would, quantizes,
and broadcasts the result as it is, bit for bit. The stream computes everything a window's
hidden states depend on one window at a time (hooks.Windows), so a window's values do not
depend on the rank that carries it. No float is summed across ranks, which is why the output
does not depend on the number of ranks.

The process group is accelerate's `PartialState` (gloo on CPU, NCCL on GPU), set up from the
environment torchrun defines (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Collectives time out
after COLLECTIVE_TIMEOUT, so a rank whose peer died fails with an error instead of hanging.
"""

from __future__ import annotations

import atexit
import heapq
import os
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from scoutq.errors import ScoutqError

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # one expert's GPTQ on real shapes takes minutes on a CPU
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run (index 0 of 1 for a plain run)."""

    index: int = 0
    count: int = 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes every file of the run; the others compute and exchange only."""
        return self.index == 0

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that does each of `costs`' items: largest first to the least-loaded rank (ties:
        the lower item, then the lower rank). A pure function of the costs, so every rank agrees."""
        load = [(0.0, rank) for rank in range(self.count)]
        owner = [0] * len(costs)
        for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            total, rank = heapq.heappop(load)
            owner[item] = rank
            heapq.heappush(load, (total + costs[item], rank))
        return owner

    def broadcast(self, value: T | None, owner: int) -> T:
        """`value` as given on rank `owner`, on every rank (pickled, so tensors arrive bit for bit)."""
        if self.count == 1:
            assert value is not None
            return value
        box: list[Any] = [value if self.index == owner else None]
        torch.distributed.broadcast_object_list(box, src=owner)
        return box[0]

    def gather(self, value: T, owner: int) -> list[T] | None:
        """Every rank's `value` in rank order on rank `owner`; None on the others."""
        if self.count == 1:
            return [value]
        box: list[Any] | None = [None] * self.count if self.index == owner else None
        torch.distributed.gather_object(value, box, dst=owner)
        return box

    def all_gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.count == 1:
            return [value]
        box: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(box, value)
        return box

    def send(self, value: Any, to: int) -> None:
        """`value` to rank `to`, which takes it with `receive`; returns once it is taken."""
        torch.distributed.send_object_list([value], dst=to)

    def receive(self, sender: int) -> Any:
        """The next value rank `sender` sent to this rank."""
        box: list[Any] = [None]
        torch.distributed.recv_object_list(box, src=sender)
        return box[0]

    def share(self, items: int) -> range:
        """This rank's contiguous share of `items` (the calibration windows): rank r holds
        [r n / N, (r + 1) n / N), so rank order is window order."""
        return range(self.index * items // self.count, (self.index + 1) * items // self.count)

    def barrier(self) -> None:
        if self.count > 1:
            torch.distributed.barrier()


WORK_NOTE_ENV = "SCOUTQ_RANK_NOTES"  # set by `--nproc`: a folder where each rank notes what it is doing


def note_work(rank: int, what: str) -> None:
    """Record what rank `rank` is working on, for the launcher's line if the rank dies (a killed
    process cannot say it). A few bytes per module, replaced atomically; a no-op without --nproc."""
    folder = os.environ.get(WORK_NOTE_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"rank-{rank}")
    with open(path + ".tmp", "w", encoding="utf-8") as note:
        note.write(what)
    os.replace(path + ".tmp", path)


def read_work_note(folder: str, rank: int) -> str | None:
    """What rank `rank` last noted it was working on, if anything."""
    try:
        with open(os.path.join(folder, f"rank-{rank}"), encoding="utf-8") as note:
            return note.read().strip() or None
    except OSError:
        return None


def launched_ranks() -> int:
    """WORLD_SIZE from the environment (torchrun's, or scoutq's own launcher's); 1 without one."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ScoutqError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous port of a run started here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rank_environment(rank: int, count: int, port: int) -> dict[str, str]:
    """The variables torchrun gives rank `rank` of `count` on one machine (what `join` reads)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(count),
            "LOCAL_WORLD_SIZE": str(count), "RANK": str(rank), "LOCAL_RANK": str(rank)}


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str) -> torch.device:
    """The device a process computes on: `cpu`, `cuda` (this rank's GPU: LOCAL_RANK modulo the
    GPUs visible), or `auto` (cuda when a GPU is visible, else cpu)."""
    if spec not in DEVICE_CHOICES:
        raise ScoutqError(f"--device {spec}: expected one of {', '.join(DEVICE_CHOICES)}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        raise ScoutqError(f"--device cuda: no CUDA device is visible (torch {torch.__version__} has {built}); "
                          "use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return torch.device("cuda", local % torch.cuda.device_count())


def join(device: torch.device | None = None) -> Ranks:
    """Join the process group the environment describes; a single-process Ranks without one."""
    if launched_ranks() == 1:
        return Ranks()
    from accelerate import PartialState

    cpu = device is None or device.type == "cpu"
    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # accelerate announces the thread count it sets; it is undone below
        warnings.simplefilter("ignore", UserWarning)
        state = PartialState(cpu=cpu, backend="gloo" if cpu else "nccl", timeout=COLLECTIVE_TIMEOUT)
    # accelerate gives each CPU rank cores / ranks threads. A matmul's float sums depend on how its
    # reduction is split between threads, so every rank keeps the thread count a single process
    # has: the bytes then do not depend on the number of ranks (set OMP_NUM_THREADS alike for
    # runs that are compared).
    torch.set_num_threads(threads)
    # Leave the group before the interpreter exits, on success and on error alike: a process that
    # exits with it still open can abort in the C++ teardown of its threads ("terminate called
    # without an active exception", SIGABRT) and would be reported as a rank that died.
    atexit.register(_leave)
    return Ranks(state.process_index, state.num_processes)


def _leave() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
