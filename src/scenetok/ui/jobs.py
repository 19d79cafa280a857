"""One background worker for long work: one training at a time, the rest wait in a visible queue.

The worker lives in the server process, not in a browser tab: closing the tab loses nothing, and any page
opened later sees the same queue. Cancel sets the job's event, which the training loop reads at the next
step boundary (``should_stop``), saving a checkpoint like Ctrl-C.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from scenetok.errors import ScenetokError, os_error_report

log = logging.getLogger("scenetok.ui")

QUEUED, RUNNING, DONE, FAILED, CANCELLED, STOPPED = "queued", "running", "done", "failed", "cancelled", "stopped"


@dataclass
class Job:
    """One unit of long work. ``work(job)`` does it; ``cancel`` is set to ask it to stop."""

    name: str  # the bundle it writes
    kind: str
    work: Callable[["Job"], str]
    id: int = 0
    status: str = QUEUED
    message: str = ""
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)

    def row(self) -> list:
        return [self.id, self.kind, self.name, self.status, self.message]


def unexpected(exc: BaseException) -> str:
    """What the page says about an error that is not the user's to fix (the traceback goes to the log)."""
    return f"error: unexpected {type(exc).__name__}; the details are in the server's log"


class Worker:
    """A single daemon thread working through a FIFO queue of :class:`Job`s."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="scenetok-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if any(j.name == job.name and j.status in (QUEUED, RUNNING) for j in self._jobs):
                raise ScenetokError(f"{job.name} is already queued or running", hint="wait for it, or cancel it first")
            job.id = next(self._ids)
            self._jobs.append(job)
        self._queue.put(job)
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    def active(self) -> Job | None:
        """The running job, else the first queued one."""
        jobs = self.jobs()
        return next((j for j in jobs if j.status == RUNNING), None) or next((j for j in jobs if j.status == QUEUED),
                                                                            None)

    def cancel(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job is None or job.status not in (QUEUED, RUNNING):
            raise ScenetokError(f"job {job_id} is not queued or running", hint="pick a queued or running job")
        job.cancel.set()
        with self._lock:
            if job.status == QUEUED:
                job.status, job.message = CANCELLED, "cancelled before it started"
            else:
                job.message = "stopping at the next step…"
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (tests, shutdown); False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while any(j.status in (QUEUED, RUNNING) for j in self.jobs()):
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def shutdown(self, timeout: float = 120) -> Job | None:
        """The server is stopping: ask the running job to stop at its next step (a training saves a
        checkpoint there, so Resume continues it later) and wait up to ``timeout`` seconds for it; queued
        jobs are dropped. Returns the job that was running, if any."""
        running = next((j for j in self.jobs() if j.status == RUNNING), None)
        with self._lock:
            for j in self._jobs:
                if j.status == QUEUED:
                    j.status, j.message = CANCELLED, "the server stopped"
        if running is not None:
            running.cancel.set()
            self.wait(timeout)
        return running

    def _loop(self) -> None:
        from scenetok.training import TrainingInterrupted

        while True:
            job = self._queue.get()
            with self._lock:
                if job.status != QUEUED:  # cancelled while waiting
                    continue
                job.status = RUNNING
            try:
                message = job.work(job)
                status = DONE
            except TrainingInterrupted as e:
                message, status = e.message + "; press Resume to continue", STOPPED
            except ScenetokError as e:
                message, status = e.report(), FAILED
            except OSError as e:  # the disk: full, read-only, permissions (a checkpoint, if any, is kept)
                message, status = os_error_report(e), FAILED
            except Exception as e:  # noqa: BLE001 - the page gets one line, the log the traceback
                log.exception("job %s (%s) failed", job.id, job.name)
                message, status = unexpected(e), FAILED
            with self._lock:
                job.status, job.message = status, message
