"""Type stubs of the Rust extension module ``distripool._native``."""

PROTOCOL_VERSION: int

class Orchestrator:
    def __init__(
        self,
        listen: list[str],
        key: bytes,
        max_crashes: int = 3,
        max_frame: int | None = None,
        cluster: str | None = None,
        encrypt: bool = True,
        tls: tuple[str, str, str] | None = None,
    ) -> None: ...
    @property
    def addresses(self) -> list[str]: ...
    @property
    def closed(self) -> bool: ...
    def start_local_agent(
        self, processes: int, python: str, module: str, env: list[tuple[str, str]]
    ) -> None: ...
    def open_client(self) -> Client: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

class Client:
    def new_job(self) -> int: ...
    def submit(
        self, job: int, function: bytes, tasks: list[tuple[int, bytes]], timeout: float | None = None
    ) -> None: ...
    def withdraw(self, job: int) -> bool: ...
    def recv(self, timeout: float) -> list[tuple[int, int, int, bytes | str]]: ...
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
) -> None: ...
def enable_logging(filter: str) -> None: ...
