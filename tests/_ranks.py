"""A pool of gloo worker processes that runs multi-rank test bodies.

Spawning processes and importing torch costs seconds per rank, so the test suite starts one pool per world
size and sends it many small bodies.  ``pool.run(fn, ...)`` calls ``fn`` on every rank; ``fn`` must be a
module-level function (``_body_*`` in a test module) that reads ``torch.distributed.get_rank()`` itself.

A failing rank must not hang the suite: its peers are usually blocked in a collective waiting for it.  So
after the first error (or dead process) we wait a short grace period for the other answers, then kill the
whole pool and raise ``RankFailure`` with every rank's story.  The next ``shared_pool()`` spawns a new pool.

Output printed by bodies is not shown (workers outlive pytest's per-test capture); return values instead.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import shutil
import tempfile
import time
import traceback
from multiprocessing.connection import wait

GRACE_S = 2.0  # after a first failure, how long the other ranks get to answer
START_TIMEOUT_S = 120.0  # spawn + import torch + rendezvous; slow on a busy 2-core machine
NO_ANSWER = "no answer (probably blocked in a collective waiting for a failed rank)"


class RankFailure(AssertionError):
    """A body failed on some rank, a worker died, or ranks did not answer in time."""


def _worker(rank: int, world_size: int, store_dir: str, conn) -> None:
    # Everything goes over the pipe as plain-pickle bytes: tensors are copied (no shared-memory handles that
    # outlive a killed worker) and an unpicklable result becomes an error instead of a silent loss.
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # several ranks share 2 cores; oversubscription makes collectives crawl
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_dir}/store",  # FileStore: no ports to collide between test runs
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=30),
        )
        reply = pickle.dumps((True, None))
    except BaseException:
        conn.send_bytes(pickle.dumps((False, traceback.format_exc())))
        return
    conn.send_bytes(reply)
    while True:
        msg = conn.recv_bytes()
        if not msg:  # stop sentinel from close()
            break
        try:
            fn, args, kwargs = pickle.loads(msg)
            reply = pickle.dumps((True, fn(*args, **kwargs)))
        except BaseException:  # includes pytest.skip/fail outcomes, which are BaseExceptions
            reply = pickle.dumps((False, traceback.format_exc()))
        conn.send_bytes(reply)
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._store_dir = tempfile.mkdtemp(prefix="hf_seqpar_ranks_")
        ctx = mp.get_context("spawn")  # fork after torch is imported is unsafe; spawn sends sys.path along
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, self._store_dir, child), daemon=True)
            proc.start()
            child.close()  # so a dead worker shows up as EOF on our end
            self._conns.append(parent)
            self._procs.append(proc)
        self._alive = True
        self._gather("init_process_group", START_TIMEOUT_S)  # surface start-up errors here, not in a test

    @property
    def alive(self) -> bool:
        return self._alive

    def run(self, fn, *args, timeout: float = 120.0, **kwargs) -> list:
        """Call ``fn(*args, **kwargs)`` on every rank; return the results ordered by rank."""
        if not self._alive:
            raise RuntimeError("RankPool is dead after an earlier failure; get a new one")
        msg = pickle.dumps((fn, args, kwargs))
        for conn in self._conns:
            conn.send_bytes(msg)
        return self._gather(getattr(fn, "__qualname__", repr(fn)), timeout)

    def _gather(self, what: str, timeout: float) -> list:
        answers: dict[int, tuple[bool, object]] = {}
        exitcodes: dict[int, int | None] = {}
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        failed = False
        while pending and (left := deadline - time.monotonic()) > 0:
            handles = {}
            for r in pending:
                handles[self._conns[r]] = r
                handles[self._procs[r].sentinel] = r
            for r in sorted({handles[h] for h in wait(list(handles), left)}):
                pending.discard(r)
                try:
                    # Check the pipe before the exit: a rank may answer and then exit.
                    answers[r] = pickle.loads(self._conns[r].recv_bytes())
                except (EOFError, OSError):
                    self._procs[r].join(5)
                    exitcodes[r] = self._procs[r].exitcode
                except Exception:
                    answers[r] = (False, "could not unpickle the answer:\n" + traceback.format_exc())
                if r in exitcodes or not answers[r][0]:
                    if not failed:  # peers of a failed rank may never answer: give them a short grace only
                        failed = True
                        deadline = min(deadline, time.monotonic() + GRACE_S)
        if not failed and not pending:
            return [answers[r][1] for r in range(self.world_size)]

        self._kill()
        if failed:
            bad = sorted(r for r in range(self.world_size) if r in exitcodes or (r in answers and not answers[r][0]))
            lines = [f"{what} failed on rank(s) {bad} of {self.world_size}"]
        else:
            lines = [f"{what} timed out after {timeout:.0f}s; rank(s) {sorted(pending)} did not answer"]
        for r in range(self.world_size):
            if r in answers:
                ok, value = answers[r]
                lines.append(f"rank {r}: ok" if ok else f"rank {r}: raised\n{value}")
            elif r in exitcodes:
                lines.append(f"rank {r}: worker process died with exit code {exitcodes[r]}")
            else:
                lines.append(f"rank {r}: {NO_ANSWER if failed else 'no answer within the timeout'}")
        raise RankFailure("\n".join(lines))

    def _kill(self) -> None:
        self._alive = False
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        self._reap()

    def _reap(self) -> None:
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():  # ignored SIGTERM (or stuck in C code): SIGKILL
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._store_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the workers cleanly (stop sentinel, join), killing any that do not exit in time."""
        if not self._alive:
            return
        self._alive = False
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
            except OSError:  # worker already gone
                pass
        self._reap()


_POOLS: dict[int, RankPool] = {}


def shared_pool(world_size: int) -> RankPool:
    """The session's live pool for ``world_size``; a dead one (after a failure) is replaced transparently."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool


def close_shared_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()
