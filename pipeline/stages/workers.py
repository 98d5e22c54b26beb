"""Worker processes that outlive a stage: started once a run, reused by every stage that fans trials out.

A `WorkerPool` holds `size` spawned processes. Each one runs its `setup` once when it starts (e.g. which GPU
it uses, how many CPU threads), then serves stages: for a stage, `run_stage(job, tasks, ...)` sends every
worker it uses the stage's `job` (picklable; `job.load(index)` gives what its tasks need, e.g. a teacher and a
parent on the worker's device, `job.run(loaded, task, report)` runs one task, `job.release(loaded)` frees
it) and puts the tasks on the pool's queue, longest first by `cost`. Each worker loads the job once, runs
tasks until the stage's end marker, releases what it loaded (the device memory goes back before the next
stage trains) and waits for the next stage, keeping its process, imports, device context and whatever the
process cached (tokenised data). So only the first stage pays for starting processes.

Messages from a worker are (kind, worker index, stage number, task, payload): "ready" (loaded; payload the
seconds the load took), "start" (payload: its pid), a job's own reports (`report(kind, payload)` from
`job.run`), "done" (payload: the task's result), "idle" (released) and "error" (payload: one line). A
worker that raises, dies, or whose stage is interrupted fails the stage (`WorkerFailure`), and the pool is
shut down: the next stage starts fresh workers. A worker whose parent process is gone exits.

`pool_for(size, setup)` keeps one pool a process (the stages of a chain run in one process), started on
first use and replaced when the setup or size asked for changes; `shutdown()` stops it (the chain and the
ablation call it when their run ends, and it runs when the process exits).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import how_it_ended

_POLL_S = 0.5  # how often a waiting worker checks that its parent is alive, and the stage that its workers are


class WorkerFailure(RuntimeError):
    """A worker raised, died or stopped during a stage: `index`, the task it was on (None: before one),
    and how (`message`: its exception line, or `exitcode` for a death)."""

    def __init__(self, index: int, task: Any, message: str | None = None, exitcode: int | None = None) -> None:
        super().__init__(message or f"worker {index} exited with code {exitcode}")
        self.index, self.task, self.message, self.exitcode = index, task, message, exitcode

    def how(self) -> str:
        """'was killed by signal SIGKILL' / 'exited with code 1' (deaths: `how_it_ended`, the words of the
        torchrun launcher's failure line too) or the exception line."""
        return self.message if self.message is not None else how_it_ended(self.exitcode)


def longest_first(tasks: Iterable[Any], cost: Callable[[Any], float]) -> list[Any]:
    """The tasks by decreasing cost; equal costs keep their given order (a stable sort), so the order, and
    with it which worker runs what, is deterministic."""
    return sorted(tasks, key=lambda task: -cost(task))


@dataclass
class StageTiming:
    """When each worker used by a stage was ready: seconds from the stage's start, and whether the process
    was started for this stage (the first stage of a run) or reused."""

    ready_s: dict[int, float]
    started: dict[int, bool]


class WorkerPool:
    def __init__(self, size: int, setup: Any) -> None:
        import multiprocessing

        self.size, self.setup = size, setup
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; the same on CPU
        self.tasks = self.context.Queue()
        self.results = self.context.Queue()
        self.controls = [self.context.Queue() for _ in range(size)]
        self.processes = [self.context.Process(target=_worker_main, name=f"stage-worker-{index}", daemon=True,
                                               args=(index, setup, self.controls[index], self.tasks, self.results,
                                                     os.getpid()))
                          for index in range(size)]
        for process in self.processes:
            process.start()
        self.stages_run = 0
        self.closed = False

    def healthy(self) -> bool:
        return not self.closed and all(process.is_alive() for process in self.processes)

    def run_stage(self, job: Any, tasks: Sequence[Any], handle: Callable[[str, int, Any, Any], None], *,
                  cost: Callable[[Any], float] = lambda task: 1.0, workers: int | None = None) -> StageTiming:
        """Run `tasks` on the first `workers` (default all) workers, longest first; `handle(kind, worker,
        task, payload)` gets every "start", job report and "done" message as it arrives (from this thread).
        Returns when every task is done and every worker used has released the job. Any failure (a
        `WorkerFailure`, or whatever `handle` raises) shuts the pool down and propagates."""
        used = min(workers or self.size, self.size)
        first_use = self.stages_run == 0
        self.stages_run += 1
        stage = self.stages_run
        begin = time.perf_counter()
        timing = StageTiming({}, {})
        try:
            for index in range(used):
                self.controls[index].put((stage, job))
            for task in longest_first(tasks, cost):
                self.tasks.put((stage, task))
            for _ in range(used):
                self.tasks.put((stage, None))
            done, idle, current = 0, set(), {}
            while done < len(tasks) or len(idle) < used:
                try:
                    kind, index, message_stage, task, payload = self.results.get(timeout=_POLL_S)
                except queue.Empty:
                    self._check_alive(current)
                    continue
                if message_stage != stage:
                    continue  # cannot happen after a clean stage; never let another stage's message count
                if kind == "error":
                    raise WorkerFailure(index, task, message=payload)
                if kind == "ready":
                    timing.ready_s[index] = time.perf_counter() - begin
                    timing.started[index] = first_use
                elif kind == "idle":
                    idle.add(index)
                    continue
                elif kind == "start":
                    current[index] = task
                elif kind == "done":
                    current.pop(index, None)
                    done += 1
                handle(kind, index, task, payload)
        except BaseException:
            self.close()
            raise
        return timing

    def _check_alive(self, current: dict[int, Any]) -> None:
        for index, process in enumerate(self.processes):
            if process.is_alive():
                continue
            while True:  # its last messages (an "error" names the exception) come first
                try:
                    kind, sender, _, task, payload = self.results.get(timeout=_POLL_S)
                except queue.Empty:
                    break
                if kind == "error":
                    raise WorkerFailure(sender, task, message=payload)
            raise WorkerFailure(index, current.get(index), exitcode=process.exitcode)

    def close(self) -> None:
        """Stop the workers: each is asked to exit, then stopped if it has not within a few seconds."""
        if self.closed:
            return
        self.closed = True
        for control, process in zip(self.controls, self.processes):
            if process.is_alive():
                try:
                    control.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        for channel in (self.tasks, self.results, *self.controls):
            channel.close()
            channel.cancel_join_thread()


_POOL: WorkerPool | None = None
_LOCK = threading.Lock()


def pool_for(size: int, setup: Any) -> WorkerPool:
    """This process's pool of `size` workers with `setup` (equal setups compare equal: use a frozen
    dataclass), started now unless a healthy one exists; another size or setup replaces it."""
    global _POOL
    with _LOCK:
        if _POOL is not None and (_POOL.size != size or _POOL.setup != setup or not _POOL.healthy()):
            _POOL.close()
            _POOL = None
        if _POOL is None:
            _POOL = WorkerPool(size, setup)
        return _POOL


def shutdown() -> None:
    """Stop this process's pool, if any (also run when the process exits)."""
    global _POOL
    with _LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown)


# --- the worker process ----------------------------------------------------------------------------

def _get(channel, parent_pid: int):
    """The next item of `channel`; exits this worker when its parent process is gone."""
    while True:
        try:
            return channel.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                raise SystemExit(1) from None


def _worker_main(index: int, setup, control, tasks, results, parent_pid: int) -> None:
    stage, task = None, None
    try:
        setup.setup(index)
        while (message := _get(control, parent_pid)) is not None:
            stage, job = message
            task = None
            started = time.perf_counter()
            loaded = job.load(index)
            results.put(("ready", index, stage, None, time.perf_counter() - started))

            def report(kind: str, payload, _stage=stage) -> None:
                if os.getppid() != parent_pid:  # the stage's process is gone: stop, do not keep a device busy
                    raise SystemExit(1)
                results.put((kind, index, _stage, task, payload))

            while True:
                stage_of_task, task = _get(tasks, parent_pid)
                if stage_of_task != stage:  # cannot happen: a failed stage shuts the pool down
                    raise RuntimeError(f"a task of stage {stage_of_task} reached stage {stage}")
                if task is None:
                    break
                results.put(("start", index, stage, task, os.getpid()))
                outcome = job.run(loaded, task, report)
                results.put(("done", index, stage, task, outcome))
            task = None
            job.release(loaded)
            del loaded
            results.put(("idle", index, stage, None, None))
    except BaseException as exc:  # noqa: BLE001  (reported as one line, then this worker exits)
        if not isinstance(exc, SystemExit):
            results.put(("error", index, stage, task, f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"))
        raise SystemExit(1) from None


__all__ = ["StageTiming", "WorkerFailure", "WorkerPool", "longest_first", "pool_for", "shutdown"]
