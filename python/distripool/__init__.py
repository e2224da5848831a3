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

Names are imported on first use, so that an executor process, which imports
only ``distripool._executor``, starts quickly.
"""

import atexit as _atexit
import importlib as _importlib
import sys as _sys

__version__ = "0.1.0"

_EXPORTS = {
    "Pool": ".pool",
    "ThreadPool": ".pool",
    "AsyncResult": ".pool",
    "ApplyResult": ".pool",
    "MapResult": ".pool",
    "IMapIterator": ".pool",
    "IMapUnorderedIterator": ".pool",
    "ProcessPoolExecutor": ".futures",
    "Executor": ".futures",
    "Orchestrator": "._orchestrator",
    "make_orchestrator": "._orchestrator",
    "make_worker": "._orchestrator",
    "DistripoolError": ".exceptions",
    "WorkerLostError": ".exceptions",
    "PoolTerminatedError": ".exceptions",
    "ResultTooLargeError": ".exceptions",
    "TaskTimeoutError": ".exceptions",
    "OrchestratorClosedError": ".exceptions",
    "AuthenticationError": ".exceptions",
    "ProtocolVersionError": ".exceptions",
    "ExecutorStartError": ".exceptions",
    "NoWorkersError": ".exceptions",
    "TimeoutError": ".exceptions",
    "MaybeEncodingError": ".exceptions",
    "RemoteTraceback": ".exceptions",
}

__all__ = list(_EXPORTS)

# What type checkers see. At run time __getattr__ imports each name on first
# use, and executors do not pay for importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:  # "X as X": re-exported, for type checkers
    from ._orchestrator import Orchestrator as Orchestrator
    from ._orchestrator import make_orchestrator as make_orchestrator
    from ._orchestrator import make_worker as make_worker
    from .exceptions import AuthenticationError as AuthenticationError
    from .exceptions import DistripoolError as DistripoolError
    from .exceptions import ExecutorStartError as ExecutorStartError
    from .exceptions import MaybeEncodingError as MaybeEncodingError
    from .exceptions import NoWorkersError as NoWorkersError
    from .exceptions import OrchestratorClosedError as OrchestratorClosedError
    from .exceptions import PoolTerminatedError as PoolTerminatedError
    from .exceptions import ProtocolVersionError as ProtocolVersionError
    from .exceptions import RemoteTraceback as RemoteTraceback
    from .exceptions import ResultTooLargeError as ResultTooLargeError
    from .exceptions import TaskTimeoutError as TaskTimeoutError
    from .exceptions import TimeoutError as TimeoutError
    from .exceptions import WorkerLostError as WorkerLostError
    from .futures import Executor as Executor
    from .futures import ProcessPoolExecutor as ProcessPoolExecutor
    from .pool import ApplyResult as ApplyResult
    from .pool import AsyncResult as AsyncResult
    from .pool import IMapIterator as IMapIterator
    from .pool import IMapUnorderedIterator as IMapUnorderedIterator
    from .pool import MapResult as MapResult
    from .pool import Pool as Pool
    from .pool import ThreadPool as ThreadPool
del TYPE_CHECKING


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distripool' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _shutdown():
    # Only what was used needs stopping.
    pool = _sys.modules.get(f"{__name__}.pool")
    if pool is not None:
        pool._terminate_all()
    orchestrator = _sys.modules.get(f"{__name__}._orchestrator")
    if orchestrator is not None:
        orchestrator._close_all()


_atexit.register(_shutdown)
