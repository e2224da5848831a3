"""Every public name of distripool, used as a program would, with the types a
checker must infer. Checked by ``mypy --strict`` (tests/test_typing.py),
never run: an ``assert_type`` that does not hold is a type error."""

from __future__ import annotations

import concurrent.futures
import multiprocessing.pool
from collections.abc import Iterator
from typing import Any, assert_type

import distripool
from distripool import (
    ApplyResult,
    AsyncResult,
    AuthenticationError,
    DistripoolError,
    Executor,
    ExecutorStartError,
    IMapIterator,
    IMapUnorderedIterator,
    MapResult,
    MaybeEncodingError,
    Orchestrator,
    OrchestratorClosedError,
    Pool,
    PoolTerminatedError,
    ProcessPoolExecutor,
    ProtocolVersionError,
    RemoteTraceback,
    ResultTooLargeError,
    TaskTimeoutError,
    ThreadPool,
    TimeoutError,
    WorkerLostError,
    make_orchestrator,
    make_worker,
)


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def describe(x: int, sep: str = ":") -> str:
    return f"{x}{sep}"


def note(result: int) -> None:
    pass


def note_all(results: list[int]) -> None:
    pass


def note_error(exc: BaseException) -> None:
    pass


def init(prefix: str) -> None:
    pass


def pools() -> None:
    with Pool(2, initializer=init, initargs=("x",), maxtasksperchild=10, task_timeout=30.0) as pool:
        assert_type(pool, Pool)
        assert_type(pool.apply(square, (3,)), int)
        assert_type(pool.apply(describe, (3,), {"sep": "-"}), str)
        applied = pool.apply_async(square, (3,), callback=note, error_callback=note_error)
        assert_type(applied, ApplyResult[int])
        assert_type(applied.get(timeout=1.5), int)
        assert_type(applied.ready(), bool)
        assert_type(applied.successful(), bool)
        applied.wait(1.0)
        assert_type(pool.map(square, range(10)), list[int])
        assert_type(pool.map(describe, [1, 2], chunksize=1), list[str])
        assert_type(pool.starmap(add, [(1, 2), (3, 4)]), list[int])
        mapped = pool.map_async(square, range(10), callback=note_all, error_callback=note_error)
        assert_type(mapped, MapResult[int])
        assert_type(mapped.get(), list[int])
        assert_type(pool.starmap_async(add, [(1, 2)]).get(), list[int])
        ordered = pool.imap(square, range(10), chunksize=2, buffersize=4)
        assert_type(ordered, IMapIterator[int])
        assert_type(next(ordered), int)
        assert_type(ordered.next(timeout=1.0), int)
        assert_type(len(ordered), int)
        for value in pool.imap_unordered(describe, range(10)):
            assert_type(value, str)
        pool.close()
        pool.join()
    pool = Pool(orchestrator=make_orchestrator("127.0.0.1:0", max_crashes=2))
    pool.terminate()
    # The standard library's AsyncResult is the same name, and generic too.
    result: AsyncResult[int] = Pool().apply_async(square, (1,))
    assert isinstance(result, ApplyResult)
    unordered: IMapUnorderedIterator[int] | None = None
    del unordered
    with ThreadPool(2) as threads:
        assert_type(threads, multiprocessing.pool.ThreadPool)
        assert_type(threads.map(square, [1]), list[int])


def executors() -> None:
    with ProcessPoolExecutor(max_workers=2, initializer=init, initargs=("x",), max_tasks_per_child=5) as ex:
        future = ex.submit(add, 1, 2)
        assert_type(future, concurrent.futures.Future[int])
        assert_type(future.result(timeout=1.0), int)
        results = ex.map(square, range(10), timeout=30.0, chunksize=2, buffersize=8)
        assert_type(results, Iterator[int])
        done, _ = concurrent.futures.wait([future])
        for f in concurrent.futures.as_completed(done):
            assert_type(f.result(), int)
        ex.shutdown(wait=True, cancel_futures=True)
    executor: concurrent.futures.Executor = Executor()
    executor.shutdown()


def clusters() -> None:
    with make_orchestrator(
        ("127.0.0.1:0",), authkey="secret", max_message_size=1 << 20, cluster="a", encrypt=True
    ) as orchestrator:
        assert_type(orchestrator, Orchestrator)
        assert_type(orchestrator.addresses, list[str])
        assert_type(orchestrator.workers, int)
        assert_type(orchestrator.slots, int)
        assert_type(orchestrator.closed, bool)
        assert_type(orchestrator.stats(), dict[str, int])
        info: list[dict[str, Any]] = orchestrator.workers_info()
        events: list[dict[str, Any]] = orchestrator.events(since=0)
        del info, events
        assert_type(orchestrator.wait_for_workers(1, timeout=5.0), bool)
        assert_type(orchestrator.drain(1), bool)
    direct = Orchestrator(["127.0.0.1:0"], b"key", tls=None, dashboard="127.0.0.1:0")
    assert_type(direct.dashboard_url, "str | None")
    direct.close()
    make_orchestrator("127.0.0.1:0", dashboard=True).close()
    Pool(2, dashboard=8787).close()
    ProcessPoolExecutor(2, dashboard="127.0.0.1:0").shutdown()
    make_worker("127.0.0.1:1337", processes=2, authkey=b"key", labels={"rack": "a"})
    make_worker(["127.0.0.1:1337"], key_file="key.txt", labels=["rack=a"])


def errors() -> None:
    try:
        Pool().apply(square, (1,))
    except WorkerLostError as exc:
        assert isinstance(exc, concurrent.futures.process.BrokenProcessPool)
    except (TaskTimeoutError, TimeoutError, ResultTooLargeError, PoolTerminatedError) as exc:
        assert isinstance(exc, DistripoolError) or isinstance(exc, TimeoutError)
    except (OrchestratorClosedError, AuthenticationError, ProtocolVersionError, ExecutorStartError) as exc:
        assert isinstance(exc, Exception)
    except MaybeEncodingError as exc:
        assert isinstance(exc, Exception)
    assert issubclass(RemoteTraceback, Exception)
    assert distripool.__version__


def launchers() -> None:
    from distripool.deploy import LaunchError, SlurmCluster, SSHCluster, kubernetes_manifest

    with SlurmCluster(2, processes=4, memory="4GB", walltime="01:00:00", skip_directives=["--mem"]) as slurm:
        assert_type(slurm.job_script(), str)
        assert_type(slurm.dry_run(), str)
        slurm.adapt(minimum=0, maximum=8)
        rows: list[dict[str, Any]] = slurm.status()
        logs: dict[str, str] = slurm.logs()
        del rows, logs
        assert_type(slurm.orchestrator, Orchestrator)
    ssh = SSHCluster(["node1", "node2"], processes=2, ssh_options=["-p", "2222"])
    ssh.scale(4)
    ssh.close()
    assert_type(kubernetes_manifest("10.0.0.5:1337", image="app:1", key=b"k", cpu="2"), str)
    assert issubclass(LaunchError, RuntimeError)
    orchestrator = make_orchestrator()
    orchestrator.upload("data")
    Pool(orchestrator=orchestrator, ship_modules=False).close()


def progress_bars() -> None:
    with Pool() as pool:
        assert_type(pool.map(square, [1, 2], progress=True), list[int])
        assert_type(pool.imap(square, [1, 2], progress="plain"), IMapIterator[int])
        pool.starmap_async(pow, [(2, 3)], progress="tqdm").get()
    with ProcessPoolExecutor() as ex:
        list(ex.map(square, [1], progress="rich"))
