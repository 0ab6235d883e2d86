"""The engine's events of managed containers, as the node view's watcher follows them (node_view.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Any, Protocol


class EventSource(Protocol):
    def managed_events(self, since_ns: int | None, actions: Iterable[str]) -> Any: ...


class StreamEnded(Exception):
    """The engine's event stream ended: the engine went away, or the watcher closed it."""


class EventFeed:
    """The engine's event stream, read on a thread of its own so the watcher can wait on it with a
    timeout. Opening may hang on a hung engine: the watcher starts no second feed while one hangs."""

    _END = object()

    def __init__(self, engine: EventSource, since_ns: int | None, actions: Iterable[str]):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._opened = threading.Event()
        self._lock = threading.Lock()
        self._stream = None
        self._closed = False
        self._ended = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, args=(engine, since_ns, tuple(actions)), name="node-view-events", daemon=True)
        self.thread.start()

    def wait_opened(self, timeout: float) -> None:
        if not self._opened.wait(timeout) or self._ended_early():
            self.close()
            raise StreamEnded(self.reason() if self._opened.is_set() else "the engine did not open its event stream in time")

    def _ended_early(self) -> bool:
        return self.error is not None or not self.thread.is_alive()

    def reason(self) -> str:
        if self.error is None:
            return "the engine's event stream ended"
        return getattr(self.error, "message", None) or f"the engine's event stream failed ({type(self.error).__name__})"

    def _read(self, engine: EventSource, since_ns: int | None, actions: tuple[str, ...]) -> None:
        try:
            stream = engine.managed_events(since_ns, actions)
            with self._lock:
                self._stream = stream
                if self._closed:
                    stream.close()
                    return
            self._opened.set()
            for event in stream:
                self._queue.put(event)
        except Exception as exc:  # the engine went away, or close() cut the stream
            self.error = exc
        finally:
            self._opened.set()
            self._queue.put(self._END)

    def next_batch(self, timeout: float) -> list[dict[str, Any]] | None:
        """The events that came within `timeout` (all that are waiting); None once the stream ended."""
        if self._ended:
            return None
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = []
        item = first
        while item is not self._END:
            batch.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch
        self._ended = True
        return batch or None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._stream is not None:
                self._stream.close()
