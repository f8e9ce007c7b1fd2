"""Autotuning: MetaSchedule records under ``tune_logs/``, keyed by target, applied at compile.

``records_passes(target, log_dir)`` gives the schedule-phase passes that apply the
best known records for ``target`` (none when no records exist for it).
"""

from .records import record_dir, records_passes, target_key

__all__ = ["record_dir", "records_passes", "target_key"]
