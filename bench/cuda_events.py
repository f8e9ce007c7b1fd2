"""Timing with CUDA events for the bench scripts (torch only: runs where TVM is not installed)."""

from __future__ import annotations

import statistics

import torch


def cuda_ms(fn, repeat: int = 50, rounds: int = 5) -> float:
    """Ms per call of ``fn``: ``repeat`` calls back to back between two CUDA events, queued behind
    a spinning kernel, the median of ``rounds`` such rounds, after 5 warm-up calls.

    Timed one call at a time (an event, the call, an event, a sync), each call's launch on the
    host sat between the events: ResNet-50's small convs all measured about 0.025 ms on an H100,
    torch's dispatch and not the kernel."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000 * repeat)  # about 0.1 ms per call to queue (2 GHz clocks)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return statistics.median(times)
