"""distripool: ``multiprocessing.Pool``, on this machine or across many.

Change one import::

    from distripool import Pool

    with Pool() as pool:                  # local executors, like multiprocessing
        print(pool.map(abs, range(-3, 3)))

and to spread the work over other machines, start an orchestrator in the
driver and ``distripool worker --connect HOST:PORT`` on each worker machine::

    from distripool import Pool, make_orchestrator

    make_orchestrator()                   # ports 1337 and 1338
    with Pool() as pool:                  # now runs on the connected workers
        ...
"""

import atexit as _atexit
import os as _os

from . import _native
from ._orchestrator import Orchestrator, make_orchestrator, make_worker
from .exceptions import (
    DistripoolError,
    MaybeEncodingError,
    PoolTerminatedError,
    RemoteTraceback,
    TimeoutError,
    WorkerLostError,
)
from .futures import Executor, ProcessPoolExecutor
from .pool import ApplyResult, AsyncResult, IMapIterator, IMapUnorderedIterator, MapResult, Pool, ThreadPool

__all__ = [
    "Pool",
    "ThreadPool",
    "ProcessPoolExecutor",
    "Executor",
    "AsyncResult",
    "ApplyResult",
    "MapResult",
    "IMapIterator",
    "IMapUnorderedIterator",
    "Orchestrator",
    "make_orchestrator",
    "make_worker",
    "DistripoolError",
    "WorkerLostError",
    "PoolTerminatedError",
    "TimeoutError",
    "MaybeEncodingError",
    "RemoteTraceback",
]

__version__ = "0.1.0"

if _os.environ.get("DISTRIPOOL_LOG"):
    _native.enable_logging(_os.environ["DISTRIPOOL_LOG"])


def _shutdown():
    from ._orchestrator import _close_all
    from .pool import _terminate_all

    _terminate_all()
    _close_all()


_atexit.register(_shutdown)
