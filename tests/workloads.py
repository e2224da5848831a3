"""Task functions for tests that start many fresh executors.

This module imports nothing heavy, so an executor that has to import it to
unpickle a task is ready in milliseconds (a test module would pull in pytest).
"""

import time


def spin_then_scale(x):
    """Half a millisecond of busy work, then ``3x + 1``."""
    t = time.perf_counter() + 0.0005
    while time.perf_counter() < t:
        pass
    return x * 3 + 1
