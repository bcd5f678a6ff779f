"""One story on several devices under MindSpore's launcher (``msrun``): who I am, my share of the panels, and the
exchange of small results between the ranks.

``msrun --worker_num=N`` starts N workers and a scheduler, all running the same script. ``start`` calls
``mindspore.communication.init()`` first: the scheduler's ``init()`` serves the cluster and ends its process, so it
never does any work, and a worker that stops before ``init()`` would leave the others waiting for the cluster to
form (``--cluster_time_out``, 600 s by default). After ``init()`` a worker that exits is noticed: msrun kills the
others, and a collective waiting on it fails at once.

The ranks split a phase's independent panels round-robin (``share``), so wave k of an exchange holds the k-th panel
of every rank, and a fixed order of panels is kept whatever the number of ranks. Results leave each rank through
``Lockstep``: one ``AllGather`` per wave, of pickled objects (between the processes of one job), so every rank
sees every result and rank 0 writes the files. A rank whose work raises sends its error in the wave instead, and
every rank stops with that rank's message: no rank is left waiting.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .errors import StoryError, describe

T = TypeVar("T")
LAUNCHER_ENV = "MS_ROLE"  # msrun sets it for every process it starts (MS_SCHED, MS_WORKER)


class RankError(StoryError):
    """Another rank of the job stopped; the message is that rank's."""


def launched() -> bool:
    """Whether this process was started by msrun (or another MindSpore launcher that sets the cluster variables)."""
    return LAUNCHER_ENV in os.environ


@dataclass
class World:
    """This process's place in the job: rank 0 of 1 when run alone. Counts the bytes it gathers."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    waves: int = 0

    @property
    def root(self) -> bool:
        """Rank 0 reads and writes the output folder; the other ranks never touch it."""
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.size}" if self.size > 1 else ""

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every size-th one from its rank on, so wave k holds items[k*size : (k+1)*size]."""
        return list(items[self.rank :: self.size])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (an ``AllGather`` of the pickled bytes, padded to the longest)."""
        self.waves += 1
        if self.size == 1:
            return [obj]
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        lengths = self._all_gather(np.array([len(data)], np.int32))
        # the CPU AllGather takes float16, float32 and int32: the bytes travel as int32 words
        padded = np.zeros(-(-int(lengths.max()) // 4) * 4, np.uint8)
        padded[: len(data)] = np.frombuffer(data, np.uint8)
        everything = self._all_gather(padded.view(np.int32)).view(np.uint8).reshape(self.size, -1)
        self.bytes_sent += padded.size + 4
        self.bytes_received += everything.size + 4 * self.size
        return [pickle.loads(everything[r, : lengths[r]].tobytes()) for r in range(self.size)]

    def _all_gather(self, array: np.ndarray) -> np.ndarray:
        from mindspore import Tensor, ops

        try:
            return ops.AllGather()(Tensor(array)).asnumpy()
        except RuntimeError as e:  # a peer exited: its connection closed, the collective failed
            raise RankError(
                f"another rank stopped (its log says why); {self.label()} stops too ({str(e).splitlines()[0]})"
            ) from None

    def same(self, what: str, value: Any) -> None:
        """Every rank must have been given the same ``value`` (settings, story, model), or its panels would differ
        from a one-process run's: compared by digest, one small wave."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()
        digests = self.gather(digest)
        other = next((r for r, d in enumerate(digests) if d != digests[0]), None)
        if other is not None:
            raise StoryError(f"rank {other} was given other {what} than rank 0: give every rank the same arguments")

    def from_root(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, its result on every rank; an error raised there stops every rank with it."""
        with Lockstep(self) as step:
            if self.root:
                step.put(make)
        return step.results[0] if step.results else None

    def check(self, make: Callable[[], Any]) -> None:
        """Run ``make()`` on every rank; if it raises on any rank, every rank stops with that rank's message."""
        with Lockstep(self) as step:
            step.put(lambda: (make(), None)[1])


class Lockstep:
    """Results from every rank, one wave at a time: ``put(work)`` runs ``work()`` here and gathers one result from
    each rank that has one; leaving the ``with`` block gathers empty waves until every rank has finished. Results
    reach ``deliver(result)`` (every rank, in rank order within a wave) and ``results``. If ``work()`` raises, the
    error goes out in the wave and every rank raises: the failing rank its own error, the others a RankError with
    its message."""

    def __init__(self, world: World, deliver: Callable[[Any], None] | None = None):
        self.world, self.deliver, self.results = world, deliver, []
        self._finished = False

    def put(self, work: Callable[[], Any]) -> None:
        try:
            result = work()
        except Exception as e:
            self.fail(e)
            raise
        self._wave(("result", result))

    def fail(self, error: Exception) -> None:
        """Send ``error`` to every rank (the caller raises it here)."""
        expected = isinstance(error, ValueError | OSError)  # the user's mistake: its message alone
        self._wave(("error", describe(error) if expected else f"{type(error).__name__}: {error}"))

    def _wave(self, mine: tuple[str, Any]) -> None:
        states = self.world.gather(mine)
        failed = [(r, value) for r, (kind, value) in enumerate(states) if kind == "error"]
        if failed and mine[0] != "error":
            rank, message = failed[0]
            raise RankError(f"rank {rank} of {self.world.size} stopped: {message}")
        if failed:
            return
        self._finished = all(kind == "done" for kind, _ in states)
        for kind, value in states:
            if kind == "result":
                self.results.append(value)
                if self.deliver is not None:
                    self.deliver(value)

    def __enter__(self) -> Lockstep:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:  # an error has already been sent, or is an interrupt that msrun handles
            while not self._finished:
                self._wave(("done", None))


class InOrder:
    """Hand items to ``deliver(key, value)`` in the order of ``keys``, whatever order they arrive in."""

    def __init__(self, keys: Sequence[Any], deliver: Callable[[Any, Any], None]):
        self.keys, self.deliver, self.next, self.waiting = list(keys), deliver, 0, {}

    def __call__(self, item: tuple[Any, Any]) -> None:
        self.waiting[item[0]] = item[1]
        while self.next < len(self.keys) and self.keys[self.next] in self.waiting:
            key = self.keys[self.next]
            self.deliver(key, self.waiting.pop(key))
            self.next += 1


def start(explicit: bool = False) -> World:
    """Join the job if msrun started this process (or ``explicit``): call ``init()`` before anything else; the
    scheduler process ends here. Alone and not ``explicit``: rank 0 of 1, nothing initialised."""
    if not (explicit or launched()):
        return World()
    if not launched():
        raise StoryError("a parallel run is started by msrun: msrun --worker_num=N --local_worker_num=N script.py ...")
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init

    init()  # the CPU collective backend on CPU, HCCL on Ascend (device_target set before); msrun gives the device
    if os.environ.get(LAUNCHER_ENV) == "MS_SCHED":  # the scheduler's work is init() itself
        raise SystemExit(0)
    return World(rank=get_rank(), size=get_group_size(), local_rank=get_local_rank())
