"""The error a stage raises for bad input, on a floor below the stages so that the layers under them (the
data layer, `pipeline.data.stage_data`) raise it too without importing `pipeline.stages`.

`pipeline.stages.common` (and `pipeline.stages`) re-export it: callers catch the one class either way.
"""

from __future__ import annotations


class StageError(ValueError):
    """Bad input to a stage (a missing teacher, unusable data, ...): one line naming what is wrong."""


__all__ = ["StageError"]
