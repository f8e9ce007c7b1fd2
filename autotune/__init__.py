"""Autotuning: MetaSchedule records under ``tune_logs/``, keyed by target, applied at compile.

``tune(models, target)`` tunes the fused kernels of some models into
``<log_dir>/<target key>/``; ``records_passes(target, log_dir)`` gives the
schedule-phase passes that apply the best known records for ``target`` (none when
no records exist for it); ``report``, ``prune`` and ``merge`` read, shrink and
combine log folders.
"""

from .database import merge, prune, report
from .records import record_dir, records_passes, target_key
from .tune import TaskResult, TuneOptions, TuneReport, tune

__all__ = ["TaskResult", "TuneOptions", "TuneReport", "merge", "prune", "record_dir", "records_passes", "report",
           "target_key", "tune"]
