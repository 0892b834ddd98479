"""The one clock every stage uses for latency measurements."""

import time


def now() -> float:
    """Monotonic seconds; comparable across threads and tasks of one process."""
    return time.perf_counter()
