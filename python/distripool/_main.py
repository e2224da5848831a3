"""The driver's main module, importable in executors the way spawn makes it.

A script's classes live in ``__main__``. Arguments refer to them by name
(``__main__.Job``), and so do the functions a pool sends: cloudpickle copies
those by value, but their classes go by name (see :func:`reduce_main`), so
that each executor has one class, not two. Executors are not the driver's
children, so each pool sends the script's source once per worker
(see ``Client.submit(needs=...)``), and an executor runs it as
``__mp_main__`` the first time a name is looked up in it, never before:
code under ``if __name__ == "__main__":`` does not run. Classes made there
pickle as ``__mp_main__.X``, which the driver resolves to its own
``__main__`` (``multiprocessing`` aliases the two), so that results come
back as the driver's own classes.

A script without that guard stops running in the executor where it would
start a pool or an orchestrator (what it defined above that line is there),
instead of starting pools in every executor.

Interactive sessions and notebooks have no file: their functions and classes
travel by value, with cloudpickle.
"""

from __future__ import annotations

import os
import sys
import types

# A main module larger than this is not sent; its names travel by value.
MAX_SOURCE = 16 << 20

_blob = None  # the driver's main module as a _native.Blob, made once
_loading = 0  # > 0 while an executor runs a driver's main module


class _StopMain(BaseException):
    """Raised where a driver's unguarded script, run in an executor, would
    start a pool: the script stops there, as if its end were reached."""


def check_not_loading(what: str) -> None:
    """Called by everything that starts pools or orchestrators."""
    if _loading:
        raise _StopMain(what)


class MainSource:
    """The driver's main module as it travels: file, package, source."""

    __slots__ = ("path", "package", "source")

    def __init__(self, path: str, package: str | None, source: bytes):
        self.path = path
        self.package = package
        self.source = source

    def __reduce__(self):
        return (MainSource, (self.path, self.package, self.source))


def _driver_source() -> MainSource | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not path:
        return None  # an interactive session or a notebook
    # spawn makes the same exception: the ipython launcher has no guard.
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    path = os.path.abspath(path)
    try:
        if os.path.getsize(path) > MAX_SOURCE:
            return None
        with open(path, "rb") as f:
            source = f.read()
    except OSError:
        return None
    spec = getattr(main, "__spec__", None)
    package = spec.parent if spec is not None else None
    return MainSource(path, package or None, source)


def driver_blob():
    """The driver's main module, ready for ``submit(needs=...)``, or None
    when it has no file. Read once, when the first pool is made."""
    global _blob
    if _blob is None:
        import pickle

        from distripool import _native

        src = _driver_source()
        _blob = False if src is None else _native.Blob(pickle.dumps(src, protocol=5))
        if src is not None and "__main__" in sys.modules:
            sys.modules.setdefault("__mp_main__", sys.modules["__main__"])
    return _blob or None


def by_reference(obj) -> bool:
    """Whether ``obj`` (a class of the driver's ``__main__``) can travel by
    name: the executors will find it under the same name."""
    if driver_blob() is None:
        return False
    target = sys.modules.get("__main__")
    for part in obj.__qualname__.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


def reduce_main(obj):
    """For a pickler's ``reducer_override``: the name of a class of the
    driver's script that executors can import, else NotImplemented.
    Functions still travel by value: a task whose function uses none of the
    script's classes never runs the script in the executor."""
    if isinstance(obj, type) and obj.__module__ == "__main__" and by_reference(obj):
        return obj.__qualname__
    return NotImplemented


# -- executor side ---------------------------------------------------------


class MainModule(types.ModuleType):
    """A driver's main module in an executor, run when a name is first
    looked up in it (``__getattr__`` is only asked for names it lacks)."""

    def __init__(self, src: MainSource):
        super().__init__("__mp_main__")
        self.__file__ = src.path
        self.__package__ = src.package
        self.__spec__ = None
        self.__loader__ = None
        self.__dict__["_distripool_source"] = src
        self.__dict__["_distripool_state"] = None  # None, "running", "loaded" or the error
        # Tracebacks show the script's lines where the file is missing, also
        # before the script runs (its functions travel by value).
        from distripool._functions import remember_lines

        remember_lines(src.path, 1, src.source.decode("utf-8", "replace").splitlines(True))

    def __getattr__(self, name):
        d = self.__dict__
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        state = d["_distripool_state"]
        if state is None:
            # Marked first: the script may look itself up while it runs.
            d["_distripool_state"] = "running"
            state = d["_distripool_state"] = _run(self, d["_distripool_source"])
        if name in d:
            return d[name]
        if isinstance(state, BaseException):
            # Not an AttributeError, which pickle would replace with its own.
            path = d["_distripool_source"].path
            raise RuntimeError(
                f"the driver's main module {path} failed to run in this executor: {state!r}"
            ) from state
        raise AttributeError(
            f"module '__mp_main__' ({d['_distripool_source'].path}) has no attribute {name!r}"
        )


def _run(module: MainModule, src: MainSource):
    """Run the driver's script in ``module``; "loaded", or why it failed."""
    global _loading
    _loading += 1
    try:
        code = compile(src.source, src.path, "exec")
        exec(code, module.__dict__)
    except _StopMain:
        pass  # an unguarded script: it stops where it would start a pool
    except BaseException as exc:  # noqa: BLE001 - reported to the task that needed it
        return exc
    finally:
        _loading -= 1
    return "loaded"


_executor_main = None


def use(module: MainModule | None) -> None:
    """Make ``module`` (None: no driver's) this executor's ``__main__``."""
    global _executor_main
    if _executor_main is None:
        _executor_main = sys.modules.get("__main__") or types.ModuleType("__main__")
    target = module if module is not None else _executor_main
    if sys.modules.get("__main__") is not target:
        sys.modules["__main__"] = sys.modules["__mp_main__"] = target
