"""Timing with CUDA events for the bench scripts (torch only: runs where TVM is not installed)."""

from __future__ import annotations

import statistics

import torch


def cuda_ms(fn, repeat: int = 50) -> float:
    """Median ms of ``repeat`` calls of ``fn``, each between two CUDA events, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
