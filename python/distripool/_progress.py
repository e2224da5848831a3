"""Progress bars for ``map`` and friends: ``progress=True``.

A bar counts items (not chunks) as their chunks come back, and shows the
tasks retried (an executor died, a worker was lost) and the items that
failed. It uses tqdm when it is installed (``distripool[progress]``), else
a one-line bar on stderr; ``progress="rich"`` and ``progress="notebook"``
use those. The pool's result thread updates it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

STYLES = ("auto", "tqdm", "rich", "notebook", "plain")
# How often the bar looks up retries in the orchestrator's events.
EVENTS_EVERY = 0.5
PLAIN_EVERY = 0.2


def check(progress: Any) -> str | None:
    """The style ``progress`` asks for, or None for no bar.

    Raises:
        ValueError: an unknown style.
        ImportError: a style whose library is not installed.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return "auto"
    if not isinstance(progress, str) or progress not in STYLES:
        raise ValueError(
            f"progress must be True, False or one of {', '.join(map(repr, STYLES))}, not {progress!r}"
        )
    need = {"tqdm": "tqdm", "notebook": "tqdm", "rich": "rich"}.get(progress)
    if need is not None:
        try:
            __import__(need)
        except ImportError:
            extra = "pip install 'distripool[progress]'" if need == "tqdm" else f"pip install {need}"
            raise ImportError(f"progress={progress!r} needs {need}: {extra}") from None
    return progress


class Bar:
    """One map's bar: ``advance`` from the result thread, ``close`` at the end."""

    def __init__(self, style: str, total: int | None, desc: str, shared, job: int):
        self.total = total
        self.done = 0
        self.failed = 0
        self.retried = 0
        self.lock = threading.Lock()
        self.closed = False
        self.shared = shared
        self.job = job
        self.seq = 0
        self.looked = 0.0
        self.drawn = 0.0
        self.started = time.monotonic()
        self.desc = desc
        self.impl: Any = None
        self.rich: Any = None
        if style == "auto":
            try:
                import tqdm  # noqa: F401

                style = "tqdm"
            except ImportError:
                style = "plain"
        self.style = style
        if style == "tqdm":
            from tqdm import tqdm

            self.impl = tqdm(total=total, desc=desc, unit="item", file=sys.stderr)
        elif style == "notebook":
            from tqdm.notebook import tqdm as ntqdm

            self.impl = ntqdm(total=total, desc=desc, unit="item")
        elif style == "rich":
            from rich.progress import Progress

            self.rich = Progress(transient=False)
            self.rich.start()
            self.impl = self.rich.add_task(desc, total=total)
        self.seq = self._first_seq()

    def _first_seq(self) -> int:
        try:
            events = self.shared.orchestrator.events()
        except Exception:  # noqa: BLE001 - closed
            return 0
        return events[-1]["seq"] + 1 if events else 0

    def _count_retries(self) -> None:
        try:
            events = self.shared.orchestrator.events(self.seq)
        except Exception:  # noqa: BLE001 - closed
            return
        client = self.shared.client.id
        for e in events:
            if e["kind"] == "task_retried" and e.get("job") == self.job and e.get("client") == client:
                self.retried += 1
        if events:
            self.seq = events[-1]["seq"] + 1

    def advance(self, items: int, failed: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.done += items
            if failed:
                self.failed += items
            now = time.monotonic()
            if now - self.looked >= EVENTS_EVERY:
                self.looked = now
                self._count_retries()
            self._show(items, now)

    def _postfix(self) -> str:
        parts = []
        if self.retried:
            parts.append(f"retried={self.retried}")
        if self.failed:
            parts.append(f"failed={self.failed}")
        return ", ".join(parts)

    def _show(self, items: int, now: float, final: bool = False) -> None:
        if self.style in ("tqdm", "notebook"):
            post = self._postfix()
            if post:
                self.impl.set_postfix_str(post, refresh=False)
            self.impl.update(items)
        elif self.style == "rich":
            post = self._postfix()
            desc = f"{self.desc} ({post})" if post else self.desc
            self.rich.update(self.impl, advance=items, description=desc)
        elif final or now - self.drawn >= PLAIN_EVERY:
            self.drawn = now
            sys.stderr.write("\r" + self.line(now))
            sys.stderr.flush()

    def line(self, now: float) -> str:
        """The plain bar: ``desc: 40%|########            | 400/1000 [12.0 items/s, retried=1]``."""
        rate = self.done / max(now - self.started, 1e-9)
        post = self._postfix()
        tail = f"[{rate:.1f} items/s{', ' + post if post else ''}]"
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * 20)
            bar = "#" * filled + " " * (20 - filled)
            return f"{self.desc}: {frac * 100:3.0f}%|{bar}| {self.done}/{self.total} {tail}"
        return f"{self.desc}: {self.done} {tail}"

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._count_retries()
            now = time.monotonic()
            if self.style in ("tqdm", "notebook"):
                post = self._postfix()
                if post:
                    self.impl.set_postfix_str(post, refresh=False)
                self.impl.close()
            elif self.style == "rich":
                self._show(0, now)
                self.rich.stop()
            else:
                sys.stderr.write("\r" + self.line(now) + "\n")
                sys.stderr.flush()


def make(progress: Any, total: int | None, desc: str, shared, job: int) -> Bar | None:
    style = check(progress)
    return None if style is None else Bar(style, total, desc, shared, job)
