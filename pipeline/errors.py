"""The error a stage raises for bad input, on a floor below the stages so that the layers under them (the
data layer, `pipeline.data.stage_data`) raise it too without importing `pipeline.stages`; and the words
every failure line uses for a process that died (`how_it_ended`: a torchrun rank, an MMR worker).

`pipeline.stages.common` (and `pipeline.stages`) re-export `StageError`: callers catch the one class either way.
"""

from __future__ import annotations


class StageError(ValueError):
    """Bad input to a stage (a missing teacher, unusable data, ...): one line naming what is wrong."""


def how_it_ended(exitcode: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it, as torchrun and
    multiprocessing report one): 'was killed by signal SIGKILL' or 'exited with code 1'."""
    if exitcode is not None and exitcode < 0:
        import signal

        return f"was killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


__all__ = ["StageError", "how_it_ended"]
