"""Type stubs of the Rust extension module ``distripool._native``; CI checks
them against the built module with ``python -m mypy.stubtest``."""

from typing import final

__all__ = [
    "Orchestrator",
    "Client",
    "Blob",
    "run_agent",
    "enable_logging",
    "keep_arenas",
    "usable_cpus",
    "read_bytes",
    "write_buffer",
    "SharedMapping",
    "Received",
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME",
    "VERSION",
    "STATUS_DONE",
    "STATUS_CRASHES",
    "STATUS_LOSSES",
    "STATUS_TIMEOUT",
    "EXECUTOR_FRAME_KINDS",
]

PROTOCOL_VERSION: int
DEFAULT_MAX_FRAME: int
VERSION: str
STATUS_DONE: int
STATUS_CRASHES: int
STATUS_LOSSES: int
STATUS_TIMEOUT: int
EXECUTOR_FRAME_KINDS: dict[str, int]

@final
class Orchestrator:
    def __new__(
        cls,
        listen: list[str],
        key: bytes,
        max_crashes: int = 3,
        max_frame: int | None = None,
        cluster: str | None = None,
        encrypt: bool = True,
        tls: tuple[str, str, str] | None = None,
        timing: list[tuple[str, float]] | None = None,
        dashboard: str | None = None,
    ) -> Orchestrator: ...
    @property
    def addresses(self) -> list[str]: ...
    @property
    def closed(self) -> bool: ...
    @property
    def dashboard_url(self) -> str | None: ...
    @property
    def workers(self) -> int: ...
    @property
    def slots(self) -> int: ...
    def start_local_agent(
        self, processes: int, python: str, module: str, env: list[tuple[str, str]]
    ) -> None: ...
    def open_client(self) -> Client: ...
    def stats(self) -> dict[str, int]: ...
    def workers_info(self) -> list[dict[str, object]]: ...
    def events(self, since: int = 0) -> list[dict[str, object]]: ...
    def drain(self, worker: int) -> bool: ...
    def close(self, graceful: bool = True) -> None: ...

@final
class Blob:
    def __new__(cls, data: bytes) -> Blob: ...
    @property
    def id(self) -> int: ...
    def __len__(self) -> int: ...

@final
class Client:
    @property
    def id(self) -> int: ...
    def new_job(self) -> int: ...
    def submit(
        self,
        job: int,
        function: bytes,
        tasks: list[tuple[int, bytes | list[bytes | memoryview]]],
        timeout: float | None = None,
        needs: list[Blob] = ...,
    ) -> None: ...
    def withdraw(self, job: int) -> list[int]: ...
    def describe(self, job: int, kind: str, name: str, items: int | None = None) -> None: ...
    def raised(self, job: int, index: int, text: str) -> None: ...
    def recv(self, timeout: float) -> list[tuple[int, int, int, bytes | Received | str]]: ...
    def expect(self, job: int) -> None: ...
    def wait(self, job: int) -> tuple[int, int, int, bytes | Received | str]: ...
    def offer(self, job: int) -> None: ...
    def forget(self, job: int) -> None: ...
    def wait_offered(
        self, job: int, timeout: float | None = None, into: object = None
    ) -> tuple[int, int, int, bytes | Received | str] | None: ...
    def close(self) -> None: ...

def run_agent(
    connect: list[str],
    key: bytes,
    processes: int,
    python: str,
    module: str,
    env: list[tuple[str, str]],
    max_frame: int | None = None,
    cluster: str | None = None,
    encrypt: bool = True,
    tls: tuple[str, str, str] | None = None,
    timing: list[tuple[str, float]] | None = None,
    labels: list[tuple[str, str]] = ...,
    idle_timeout: float | None = None,
    time_limit: float | None = None,
    ready_file: str | None = None,
    memory_limit: int | None = None,
    serve_peers: bool = True,
) -> str: ...
def enable_logging(filter: str) -> None: ...
def keep_arenas() -> None: ...
def read_bytes(fd: int, offset: int, length: int) -> bytes: ...
def write_buffer(fd: int, offset: int, buffer: object) -> None: ...

@final
class SharedMapping:
    @staticmethod
    def of_resident(fd: int) -> SharedMapping | None: ...
    @property
    def length(self) -> int: ...
    def write(self, offset: int, buffer: object) -> None: ...
    def close(self) -> None: ...

@final
class Received:
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> int: ...
    def head(self, end: int) -> bytes: ...
    def take(self, start: int, length: int, writable: bool) -> bytes | bytearray: ...

def usable_cpus() -> int: ...
