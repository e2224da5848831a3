"""distripool on one machine: the embedded default, no cluster needed.

Run it with ``make run`` (which installs the package first) or
``python examples/quickstart.py``.
"""

import math
import os
import time

from distripool import Pool


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


if __name__ == "__main__":
    numbers = range(1_000_000, 1_050_000)
    start = time.perf_counter()
    with Pool() as pool:  # one executor per CPU, like multiprocessing.Pool()
        flags = pool.map(is_prime, numbers)
        scale = 10
        scaled = pool.map(lambda x: x * scale, range(5))  # lambdas and closures work
        workers = set(pool.map(lambda _: os.getpid(), range(100), chunksize=1))
    elapsed = time.perf_counter() - start
    print(f"{sum(flags)} primes between {numbers.start:,} and {numbers.stop:,}")
    print(f"closure result: {scaled}")
    print(f"{len(workers)} executor processes, {elapsed:.2f} s in all")
