"""A latest-state-wins work queue: producers record a value per key, one thread takes
everything pending at once and works on it as one batch. A key submitted again before its
batch started is worked on once, so a burst of changes costs one batch, not one per change.
A value can also be submitted to fall due later; submitting its key again first replaces it."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Hashable, Iterator, Mapping

log = logging.getLogger(__name__)


class CoalescingWorker:
    """`work(batch)` runs on the worker's own thread (started by `start()`, in the network
    namespace of the thread calling it) with a dict of everything submitted since the last
    batch. A batch that raises is logged and its items submitted again (newer values submitted
    meanwhile win), after `retry_delay` seconds."""

    def __init__(self, name: str, work: Callable[[dict], None], retry_delay: float = 1.0):
        self.name = name
        self.retry_delay = retry_delay
        self.cancel = threading.Event()  # set by stop(): a long batch should end early
        self.batches = 0                 # batches worked on
        self.items = 0                   # items in them, all told
        self._work = work
        self._pending: dict = {}
        self._later: dict = {}   # key -> (monotonic time it falls due, value)
        self._in_flight = 0      # items of the running batch not yet reported done
        self._running = False
        self._poked = False
        self._holds = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, items: Mapping[Hashable, object], keep_first: bool = False) -> None:
        """Record `items`; with keep_first, a key already pending keeps its value."""
        if not items:
            return
        with self._changed:
            if keep_first:
                for key, value in items.items():
                    self._pending.setdefault(key, value)
            else:
                self._pending.update(items)
            for key in items:
                self._later.pop(key, None)
            self._changed.notify_all()

    def submit_later(self, items: Mapping[Hashable, object], delay: float) -> None:
        """Record `items` to be worked on `delay` seconds from now, unless their key is
        submitted again first (then that value replaces them)."""
        due = time.monotonic() + delay
        with self._changed:
            for key, value in items.items():
                self._pending.pop(key, None)
                self._later[key] = (due, value)
            self._changed.notify_all()

    def poke(self) -> None:
        """Run a batch even if nothing is pending (the work function has work of its own)."""
        with self._changed:
            self._poked = True
            self._changed.notify_all()

    def item_done(self) -> None:
        """From the work function: one more item of the running batch is finished (so that
        `pending` counts down during a long batch)."""
        with self._changed:
            self._in_flight = max(0, self._in_flight - 1)

    def take(self) -> dict:
        """Everything pending, due or not, which no batch will see (the caller handles it)."""
        with self._changed:
            taken, self._pending = self._pending, {}
            taken.update((key, value) for key, (_, value) in self._later.items())
            self._later.clear()
            return taken

    @property
    def pending(self) -> int:
        """Items submitted and not yet worked on, those of the batch running and those not yet
        due included."""
        with self._changed:
            return len(self._pending) + len(self._later) + self._in_flight

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the running batch (which sees `cancel` set); False if it did not end."""
        self.cancel.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is pending or running (False after `timeout` seconds)."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._pending or self._later or self._poked or self._running),
                                          timeout)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No batch starts inside the block (one already running finishes): what is submitted
        meanwhile coalesces into the next batch."""
        with self._changed:
            self._holds += 1
        try:
            yield
        finally:
            with self._changed:
                self._holds -= 1
                self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    until_due = self._move_due()
                    if self.cancel.is_set() or ((self._pending or self._poked) and not self._holds):
                        break
                    self._changed.wait(until_due)
                if self.cancel.is_set():
                    return
                batch, self._pending = self._pending, {}
                self._in_flight, self._running, self._poked = len(batch), True, False
            failed = False
            try:
                self._work(batch)
            except Exception:  # the worker must outlive a failing batch; the batch is retried
                log.exception("%s: a batch of %d failed; retrying in %g s", self.name, len(batch),
                              self.retry_delay)
                failed = True
            with self._changed:
                self._in_flight, self._running = 0, False
                self.batches += 1
                self.items += len(batch)
                if failed:
                    for key, value in batch.items():
                        self._pending.setdefault(key, value)
                self._changed.notify_all()
            if failed:
                self.cancel.wait(self.retry_delay)

    def _move_due(self) -> float | None:
        """(Lock held.) Move the values now due to the pending ones; seconds until the next one
        falls due (None: none waits)."""
        now = time.monotonic()
        for key in [key for key, (due, _) in self._later.items() if due <= now]:
            self._pending[key] = self._later.pop(key)[1]
        return min(due for due, _ in self._later.values()) - now if self._later else None
