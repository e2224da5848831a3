"""How a pool's functions travel: cloudpickle, with three changes.

- The driver script's classes go by name (see ``_main.reduce_main``).
- Code objects keep their file name; cloudpickle would rename it
  ``<dynamic-code>``, and tracebacks would lose the user's file and lines.
- Each code object carries its own source lines, so that a worker that
  lacks the file still shows them in a traceback. They are part of the
  function's blob, which reaches each worker once.
"""

from __future__ import annotations

import marshal
import sys
import types

from distripool import _envelope, _main

_pickler = None


def _make_pickler():
    global _pickler
    import cloudpickle

    class _Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is types.CodeType:
                return _reduce_code(obj)
            name = _main.reduce_main(obj)
            return super().reducer_override(obj) if name is NotImplemented else name

    _pickler = _Pickler
    return _Pickler


def dumps(obj) -> bytes:
    """Pickle a pool's function (with its settings); its large buffers go
    beside the pickle (``_envelope.function_blob``)."""
    import io

    f = io.BytesIO()
    beside = _envelope._KeepOut()
    (_pickler or _make_pickler())(f, protocol=5, buffer_callback=beside).dump(obj)
    return _envelope.function_blob(f.getvalue(), beside.bufs)


def dumps_inherited(obj, popen) -> bytes:
    """Pickle a pool's function and settings as for a process that
    ``popen`` (see ``_inherited``) spawns: multiprocessing's queues, locks
    and shared memory in its initargs travel as they do to a spawned child."""
    import io

    from distripool import _inherited

    f = io.BytesIO()
    beside = _envelope._KeepOut()
    pickler = (_inheriting or _make_inheriting())(f, protocol=5, buffer_callback=beside)
    pickler.popen = popen
    with _inherited.spawning(popen):
        pickler.dump(obj)
    return _envelope.function_blob(f.getvalue(), beside.bufs)


_inheriting = None


def _make_inheriting():
    global _inheriting
    from collections import ChainMap
    from multiprocessing.reduction import ForkingPickler

    from distripool import _inherited

    base = _pickler or _make_pickler()

    class _Inheriting(base):
        # Connections, sockets and shared-memory arenas reduce as in
        # multiprocessing's own pickler.
        dispatch_table = ChainMap(ForkingPickler._extra_reducers, base.dispatch_table)
        popen = None

        def reducer_override(self, obj):
            synchronize = sys.modules.get("multiprocessing.synchronize")
            if synchronize is not None and isinstance(obj, synchronize.SemLock):
                reduced = _inherited.reduce_semaphore(obj, self.popen)
                if reduced is not NotImplemented:
                    return reduced
            return super().reducer_override(obj)

    _inheriting = _Inheriting
    return _Inheriting


# Each code object's reduction, made once: pools pickle their function at
# every call, and a program has a bounded number of code objects.
_reduced: dict = {}


def _reduce_code(code: types.CodeType):
    # By identity: hashing a code object hashes its contents. The entry
    # holds the code object, so that its id is not reused.
    entry = _reduced.get(id(code))
    if entry is None or entry[0] is not code:
        if len(_reduced) >= 4096:
            _reduced.clear()  # a program that makes code at run time
        args = (marshal.dumps(code), sys.version_info[:2], code.co_filename, _lines_of(code))
        entry = _reduced[id(code)] = (code, (load_code, args))
    return entry[1]


def _line_numbers(code: types.CodeType):
    if hasattr(code, "co_lines"):  # Python 3.10 and later
        lines = (line for _, _, line in code.co_lines())
    else:
        import dis

        lines = (line for _, line in dis.findlinestarts(code))
    yield from (line for line in lines if line is not None)
    for const in code.co_consts:
        if type(const) is types.CodeType:
            yield from _line_numbers(const)


def _lines_of(code: types.CodeType):
    """``(first line number, its lines)`` of ``code``'s source, or None."""
    import linecache

    lines = linecache.getlines(code.co_filename)
    if not lines:
        return None
    first = code.co_firstlineno
    last = max(_line_numbers(code), default=first)
    return first, lines[first - 1 : last]


def load_code(data: bytes, version, filename: str, lines):
    """A code object, in an executor; remembers its source lines."""
    if tuple(version) != sys.version_info[:2]:
        raise RuntimeError(
            f"a function from {filename} was sent by Python {version[0]}.{version[1]}; this executor runs "
            f"Python {sys.version_info[0]}.{sys.version_info[1]}: functions that travel by value need the "
            "same version on the driver and the workers"
        )
    if lines is not None:
        remember_lines(filename, *lines)
    return marshal.loads(data)


# Source lines sent with functions, by file: filename -> list of lines
# ("\n" where none was sent). Tracebacks read them where the file is missing.
_sent: dict = {}


def remember_lines(filename: str, first: int, lines) -> None:
    """Keep ``lines`` (from line ``first`` on) of ``filename`` for
    :func:`restore_lines`."""
    have = _sent.setdefault(filename, [])
    end = first - 1 + len(lines)
    if len(have) < end:
        have.extend("\n" for _ in range(end - len(have)))
    have[first - 1 : end] = lines


def restore_lines() -> None:
    """Before a traceback is formatted: give linecache the lines sent for
    each file that is not here (linecache keeps entries without a time
    stamp, which no file backs)."""
    if not _sent:
        return
    import linecache
    import os

    for filename, lines in _sent.items():
        entry = linecache.cache.get(filename)
        if (entry is None or len(entry) > 1 and entry[2] is not lines) and not os.path.exists(filename):
            linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


# -- reusing a function's pickle -------------------------------------------

_ABSENT = object()
_PLAIN = frozenset(
    {
        int,
        float,
        complex,
        str,
        bytes,
        bool,
        type(None),
        type(...),
        types.ModuleType,
    }
)
# How deep functions that call functions are followed.
_DEPTH = 4
# Each code object's global names, found once (as for _reduced).
_names: dict = {}


def fingerprint(func) -> tuple | None:
    """Everything a plain function's pickle depends on that a program could
    rebind between two calls: the function, its code, and the objects its
    defaults, closure and global names refer to. None if one of those could
    change in place (a list, a dict, an instance, a function's attributes):
    then only pickling the function again tells."""
    out: list = []
    return tuple(out) if _collect(func, out, 0) else None


def same(a: tuple, b: tuple) -> bool:
    """Whether two fingerprints name the very same objects."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _collect(func, out: list, depth: int) -> bool:
    if depth > _DEPTH or func.__dict__:
        return False
    code = func.__code__
    out += (func, code)
    for v in func.__defaults__ or ():
        if not _stable(v, out, depth):
            return False
    kw = func.__kwdefaults__
    if kw:
        for k, v in kw.items():
            out.append(k)
            if not _stable(v, out, depth):
                return False
    for cell in func.__closure__ or ():
        try:
            v = cell.cell_contents
        except ValueError:  # not yet bound
            v = _ABSENT
        if not _stable(v, out, depth):
            return False
    g = func.__globals__
    for name in _global_names(code):
        if not _stable(g.get(name, _ABSENT), out, depth):
            return False
    return True


def _stable(v, out: list, depth: int) -> bool:
    t = type(v)
    if t in _PLAIN or v is _ABSENT:
        out.append(v)
        return True
    if t is types.FunctionType:
        return _collect(v, out, depth + 1)
    if t is types.BuiltinFunctionType:
        # `len`, `math.sqrt`; not a bound method such as `some_list.append`,
        # which pickles the list it belongs to.
        out.append(v)
        return v.__self__ is None or type(v.__self__) is types.ModuleType
    if t is tuple or t is frozenset:
        out.append(v)
        return len(v) <= 32 and all(_stable(x, out, depth) for x in v)
    if isinstance(v, type):
        # A class pickled by name (importable, or one of the driver's
        # script's that executors import); one pickled by value could have
        # its attributes changed.
        out.append(v)
        if v.__module__ == "__main__":
            return _main.by_reference(v)
        return "<locals>" not in v.__qualname__
    return False


def _global_names(code: types.CodeType) -> tuple:
    entry = _names.get(id(code))
    if entry is None or entry[0] is not code:
        if len(_names) >= 4096:
            _names.clear()
        names = set(code.co_names)
        for const in code.co_consts:
            if type(const) is types.CodeType:
                names.update(_global_names(const))
        entry = _names[id(code)] = (code, tuple(sorted(names)))
    return entry[1]
