"""Exceptions of distripool.

Errors that ``multiprocessing.Pool`` users already know keep their stdlib
types: ``multiprocessing.TimeoutError`` from ``get(timeout)``,
``ValueError("Pool not running")`` after ``close()``, and
``multiprocessing.pool.MaybeEncodingError`` for results that cannot be
pickled. The classes here cover what only a distributed pool can run into.
"""

import builtins
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import TimeoutError  # noqa: F401  (re-exported)
from multiprocessing.pool import MaybeEncodingError, RemoteTraceback  # noqa: F401


class DistripoolError(Exception):
    """Base class of the errors raised by distripool itself.

    Raised only for conditions of the distributed machinery; exceptions raised
    by a task are re-raised with their own type.
    """


class WorkerLostError(DistripoolError, BrokenProcessPool):
    """Raised when a task could not be completed because its workers kept dying.

    Each time the executor running a task dies (killed, segfault, ``os._exit``)
    the task is retried elsewhere. After the pool's crash limit is reached the
    task fails with this error; its message names every attempt's cause. It is
    also a ``concurrent.futures.process.BrokenProcessPool`` (a
    ``RuntimeError``), what code written for ``ProcessPoolExecutor`` catches;
    unlike there, only that task fails, and the pool stays usable.
    """


class PoolTerminatedError(DistripoolError):
    """Raised by ``get()`` of a result that was still pending when its pool was
    terminated or its orchestrator closed."""


class ResultTooLargeError(DistripoolError):
    """Raised when a task's pickled result is larger than the frame limit, so
    it cannot be sent back. The executor stays usable; only that task fails."""


class TaskTimeoutError(DistripoolError, builtins.TimeoutError):
    """Raised when a task ran longer than the pool's ``task_timeout``.

    The executor running it was killed (and replaced), and the task is not
    retried. It is also a :class:`TimeoutError`, but not the
    ``multiprocessing.TimeoutError`` that ``get(timeout)`` raises when a result
    is merely not ready yet.
    """


class OrchestratorClosedError(DistripoolError, RuntimeError):
    """Raised when an orchestrator that is closed (or gone) is asked to do
    something: open a pool, take back tasks, drain a worker. Pools turn it
    into :class:`PoolTerminatedError` for their pending results."""


class AuthenticationError(DistripoolError, PermissionError):
    """Raised when a peer fails the handshake: a wrong key, another cluster
    name, or encryption on one side and off on the other."""


class ProtocolVersionError(DistripoolError, ConnectionError):
    """Raised when a peer speaks another version of the wire protocol; the
    message names both. Install the same distripool version on both sides."""


class ExecutorStartError(DistripoolError, RuntimeError):
    """Raised by a worker whose executors cannot start at all (five in a row
    died before they were up, or none could be spawned): it stops instead of
    joining again, since every session would end the same way."""


class NoWorkersError(DistripoolError, builtins.TimeoutError):
    """Raised by a pool made with ``wait_for_workers=timeout`` when no worker
    has been connected for that long: when the pool is made, or for the
    tasks it has pending. The message says where workers must connect and
    which connections were refused, and why."""
