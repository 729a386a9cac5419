"""The latest-state-wins queue: batches, and values that fall due later."""
import threading
import time

import pytest

from flannel_bpf.controller.coalesce import CoalescingWorker


class Recorder:
    def __init__(self):
        self.batches: list[tuple[float, dict]] = []
        self.done = threading.Condition()

    def __call__(self, batch: dict) -> None:
        with self.done:
            self.batches.append((time.monotonic(), dict(batch)))
            self.done.notify_all()

    def merged(self) -> dict:
        merged = {}
        for _, batch in self.batches:
            merged.update(batch)
        return merged


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def worker(recorder):
    worker = CoalescingWorker("test-coalesce", recorder)
    worker.start()
    yield worker
    assert worker.stop(5)


def test_a_burst_under_hold_is_one_batch_with_the_latest_values(worker, recorder):
    with worker.hold():
        for value in range(5):
            worker.submit({"a": value, "b": -value})
        assert worker.pending == 2
    assert worker.wait_idle(5)
    assert [batch for _, batch in recorder.batches] == [{"a": 4, "b": -4}]


def test_a_value_due_later_is_worked_on_only_when_due(worker, recorder):
    submitted = time.monotonic()
    worker.submit_later({"gone": None}, 0.3)
    worker.submit({"now": 1})
    assert worker.pending >= 1
    assert worker.wait_idle(5)
    assert [batch for _, batch in recorder.batches] == [{"now": 1}, {"gone": None}]
    assert recorder.batches[1][0] - submitted >= 0.3


def test_submitting_the_key_again_before_it_is_due_replaces_the_later_value(worker, recorder):
    worker.submit_later({"peer": None}, 0.3)
    worker.submit({"peer": "back"})
    time.sleep(0.5)
    assert worker.wait_idle(5)
    assert recorder.merged() == {"peer": "back"}
    assert all(batch != {"peer": None} for _, batch in recorder.batches)


def test_a_later_value_replaces_a_pending_one(worker, recorder):
    with worker.hold():
        worker.submit({"peer": "old"})
        worker.submit_later({"peer": None}, 0.1)
    assert worker.wait_idle(5)
    assert [batch for _, batch in recorder.batches] == [{"peer": None}]


def test_take_returns_values_not_yet_due_and_they_never_run(worker, recorder):
    with worker.hold():
        worker.submit({"a": 1})
        worker.submit_later({"b": None}, 0.2)
        assert worker.take() == {"a": 1, "b": None}
    time.sleep(0.4)
    assert worker.wait_idle(5) and recorder.batches == []
