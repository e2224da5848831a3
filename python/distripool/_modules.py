"""The driver's own modules, sent to workers that cannot import them.

A function that uses a module the driver loaded from a file outside
site-packages and the standard library (the user's ``helpers.py``, a
package next to the script) fails on a worker that lacks the file. So each
pool on an orchestrator sends those modules' sources with its functions, as
needs (see ``Client.submit(needs=...)``): one blob per top-level module or
package, content-addressed by the core, so that each reaches a worker once
and travels again only when it changes. A package goes whole (its ``.py``
files), for the submodules it imports lazily.

On the worker, the sources wait in a finder at the end of ``sys.meta_path``:
a module the worker can import itself is imported from there, as before;
only one it cannot import comes from the driver's source.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig

log = logging.getLogger("distripool")

# A module or package larger than this is not sent (a warning says so).
MAX_MODULE = 8 << 20
MAX_FILES = 2000


class ModuleSource:
    """A top-level module or package as it travels: ``{name: (filename,
    source, is_package)}`` for it and its submodules."""

    __slots__ = ("top", "files")

    def __init__(self, top: str, files: dict[str, tuple[str, bytes, bool]]):
        self.top = top
        self.files = files

    def __reduce__(self):
        return (ModuleSource, (self.top, self.files))


# -- driver side -----------------------------------------------------------


def _system_dirs() -> tuple[str, ...]:
    import site

    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.realpath(path))
    for path in [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]:
        dirs.add(os.path.realpath(path))
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        dirs.add(os.path.realpath(os.path.join(prefix, "lib")))
    here = os.path.realpath(os.path.dirname(__file__))
    dirs.add(here)
    return tuple(sorted(dirs))


_system: tuple[str, ...] | None = None


def _is_users(path: str) -> bool:
    """Whether ``path`` is the user's own file: not in the standard library,
    site-packages or distripool."""
    global _system
    if _system is None:
        _system = _system_dirs()
    real = os.path.realpath(path)
    if "site-packages" in real.split(os.sep) or "dist-packages" in real.split(os.sep):
        return False
    return not any(real == d or real.startswith(d + os.sep) for d in _system)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _package_files(top: str, directory: str) -> dict[str, tuple[str, bytes, bool]] | None:
    files: dict[str, tuple[str, bytes, bool]] = {}
    total = 0
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(
            d for d in dirs if d.isidentifier() and os.path.exists(os.path.join(root, d, "__init__.py"))
        )
        rel = os.path.relpath(root, directory)
        prefix = top if rel == "." else top + "." + rel.replace(os.sep, ".")
        for name in sorted(names):
            if not name.endswith(".py") or not name[:-3].isidentifier():
                continue
            path = os.path.join(root, name)
            source = _read(path)
            if source is None:
                continue
            total += len(source)
            if total > MAX_MODULE or len(files) >= MAX_FILES:
                return None
            is_pkg = name == "__init__.py"
            files[prefix if is_pkg else f"{prefix}.{name[:-3]}"] = (path, source, is_pkg)
    return files


def _source_of(top: str, module) -> ModuleSource | None:
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py") or not _is_users(path):
        return None
    if hasattr(module, "__path__"):
        files = _package_files(top, os.path.dirname(path))
    else:
        source = _read(path)
        files = None if source is None or len(source) > MAX_MODULE else {top: (path, source, False)}
    if files is None:
        log.warning(
            "distripool: the module %s (%s) is too large to send to workers; install it there", top, path
        )
        return None
    return ModuleSource(top, files)


# Each top-level module's blob, made once per process (None: not sent).
_blobs: dict[str, object] = {}


def shipped() -> list:
    """The blobs of the driver's own modules, for ``submit(needs=...)``.
    Pools ask again only when ``sys.modules`` has grown."""
    import pickle

    from distripool import _native

    out = []
    for top in sorted({name.partition(".")[0] for name in list(sys.modules)}):
        if top in ("__main__", "__mp_main__") or top.startswith("distripool"):
            continue
        if top not in _blobs:
            module = sys.modules.get(top)
            src = None if module is None else _source_of(top, module)
            _blobs[top] = None if src is None else _native.Blob(pickle.dumps(src, protocol=5))
        blob = _blobs[top]
        if blob is not None:
            out.append(blob)
    return out


# -- worker side -----------------------------------------------------------


class _Finder:
    """Finds the modules sent by drivers; last on ``sys.meta_path``."""

    def __init__(self):
        self.files: dict[str, tuple[str, bytes, bool]] = {}

    def find_spec(self, name, path=None, target=None):
        entry = self.files.get(name)
        if entry is None:
            return None
        import importlib.util

        filename, _, is_pkg = entry
        spec = importlib.util.spec_from_loader(name, self, origin=filename, is_package=is_pkg)
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename, source, is_pkg = self.files[module.__name__]
        from distripool._functions import remember_lines

        remember_lines(filename, 1, source.decode("utf-8", "replace").splitlines(True))
        module.__file__ = filename
        if is_pkg:
            module.__path__ = []
        exec(compile(source, filename, "exec"), module.__dict__)


_finder: _Finder | None = None


def install(src: ModuleSource) -> None:
    """Make ``src``'s modules importable here, after everything else."""
    global _finder
    if _finder is None:
        _finder = _Finder()
        sys.meta_path.append(_finder)
    _finder.files.update(src.files)


# -- uploads (Orchestrator.upload) -------------------------------------------

MAX_UPLOAD = 512 << 20


class Upload:
    """A file or directory as it travels: its name and a tar of it."""

    __slots__ = ("name", "digest", "tar")

    def __init__(self, name: str, digest: str, tar: bytes):
        self.name = name
        self.digest = digest
        self.tar = tar

    def __reduce__(self):
        return (Upload, (self.name, self.digest, self.tar))


def pack(path) -> Upload:
    """``path`` (a file or a directory) as an :class:`Upload`.

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: it is larger than 512 MiB.
    """
    import hashlib
    import io
    import tarfile

    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot upload {path}: no such file or directory")
    name = os.path.basename(path.rstrip(os.sep)) or "upload"
    buf = io.BytesIO()

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=name, filter=clean)
        if buf.tell() > MAX_UPLOAD:
            raise ValueError(f"cannot upload {path}: larger than {MAX_UPLOAD >> 20} MiB")
    data = buf.getvalue()
    if len(data) > MAX_UPLOAD:
        raise ValueError(f"cannot upload {path}: larger than {MAX_UPLOAD >> 20} MiB")
    return Upload(name, hashlib.sha256(data).hexdigest()[:32], data)


def uploads_dir() -> str:
    """Where uploads land on this worker: a directory of its own that the
    worker removes when it stops (``$DISTRIPOOL_WORK_DIR``), else one per
    agent in the temporary directory."""
    import tempfile

    base = os.environ.get("DISTRIPOOL_WORK_DIR") or os.path.join(
        tempfile.gettempdir(), f"distripool-{os.getuid()}-{os.getppid()}"
    )
    path = os.path.join(base, "uploads")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def unpack(upload: Upload) -> None:
    """Put ``upload`` in this worker's uploads directory (once per worker,
    whichever executor comes first), which becomes this executor's working
    directory and the first entry of its ``sys.path``."""
    import fcntl
    import io
    import shutil
    import tarfile

    target = uploads_dir()
    done = os.path.join(target, f".done-{upload.digest}")
    with open(os.path.join(target, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(done):
            old = os.path.join(target, upload.name)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            with tarfile.open(fileobj=io.BytesIO(upload.tar)) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(target, filter="data")
                else:  # an old patch release: refuse what could escape
                    for m in tar.getmembers():
                        if m.name.startswith("/") or ".." in m.name.split("/") or m.issym() or m.islnk():
                            raise ValueError(f"upload {upload.name}: unsafe member {m.name!r}")
                    tar.extractall(target)
            open(done, "w").close()
    if os.getcwd() != target:
        os.chdir(target)
    if target not in sys.path:
        sys.path.insert(0, target)
    import importlib

    importlib.invalidate_caches()
