"""The inference worker: a bounded queue of jobs and one thread that runs them, batching compatible ones.

Engines run here, off the gRPC event loop, so health checks, listings and new requests are answered while a batch
denoises. A job is checked before every step: cancelled or past its deadline, it leaves the batch and the others
carry on. Events (queued, progress, images) go to the job's listener from this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from .models import ServedModel
from .params import GenerateParams
from .pipeline import GenerateResult, StageTimes, encode_images, preview_images, render_members

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down; send to another replica"


class QueueFull(RuntimeError):
    def __init__(self, capacity: int, retry_after_ms: int):
        super().__init__(f"the queue is full ({capacity} requests waiting); retry in about {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class WorkerStopping(RuntimeError):
    pass


class JobCancelled(RuntimeError):
    pass


class DeadlineExceeded(RuntimeError):
    pass


class RequestFailed(RuntimeError):
    """This request failed on its own (an engine, its encoding, its listener); the message is safe to show a client.
    The cause, with its traceback, goes to the server log."""


@dataclass(frozen=True)
class WorkerConfig:
    # Requests waiting beyond this are refused at once: memory stays bounded and callers can retry elsewhere.
    queue_capacity: int = 64
    batching: bool = True
    # How long the first request of a batch waits for compatible company; a few ms against ~100 ms of work.
    max_batch_wait_ms: float = 5.0


@dataclass(frozen=True)
class Queued:
    position: int
    depth: int


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    eta_ms: float
    previews: Sequence[bytes] = ()


@dataclass(frozen=True)
class ImageReady:
    index: int
    data: bytes
    mime_type: str


Event = Queued | Progress | ImageReady


@dataclass(eq=False)
class Job:
    """One request on its way through the worker; also the pipeline's view of a batch member."""

    model: ServedModel
    params: GenerateParams
    deadline: float | None = None  # time.monotonic() seconds
    listener: Callable[[Event], None] | None = None
    preview_interval: int = 0
    accepted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    times: StageTimes = field(default_factory=StageTimes)
    steps_done: int = 0
    batch_size: int = 0
    # Set when something that concerns this request alone failed; the job then stops at the next step.
    failure: RequestFailed | None = None

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share engine calls: same plan and start call, same rows per image, same text
        length. The task is not in it: an ordinary U-Net's rows do not depend on it (inpainting blends each member's
        own rows after the call), and an inpainting U-Net serves one task."""
        p = self.params
        return (p.model, p.width, p.height, p.steps, p.scheduler, p.guided, p.start, p.text_length)

    def cancel(self) -> None:
        self.cancelled.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def proceed(self) -> bool:
        return self.failure is None and not self.cancelled.is_set() and not self.expired()

    def stop_reason(self) -> Exception:
        if self.failure is not None:
            return self.failure
        if self.cancelled.is_set():
            return JobCancelled(f"request {self.params.request_id} was cancelled")
        return DeadlineExceeded(f"request {self.params.request_id} passed its deadline")

    def fail(self, stage: str, error: Exception) -> None:
        """Records a failure of this request alone; its batch-mates carry on."""
        log.error("request %s: %s failed", self.params.request_id, stage, exc_info=error)
        if self.failure is None:
            self.failure = RequestFailed(
                f"request {self.params.request_id}: {stage} failed on the server; its log has the details"
            )

    def emit(self, event: Event) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event)
        except Exception as e:  # e.g. the caller's event loop is gone: only this request is affected
            self.fail("delivering an event", e)

    def on_step(self, step: int, total: int, latents: np.ndarray, step_ms: float) -> None:
        self.steps_done = step
        if self.listener is None:  # a unary call: nobody receives progress or previews
            return
        previews: Sequence[bytes] = ()
        if self.preview_interval and (step % self.preview_interval == 0 or step == total):
            try:
                previews = preview_images(self.model, latents)
            except Exception as e:
                self.fail("rendering a preview", e)
                return
        # The decode and encode that follow cost about two steps on the models measured here.
        self.emit(Progress(step, total, step_ms * (total - step + 2), previews))

    def settle(self, result: GenerateResult | None = None, error: Exception | None = None) -> None:
        """Delivers the outcome once; a future already settled (or cancelled by its caller) is left as it is."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except InvalidStateError:
            pass


class InferenceWorker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        self._running: list[Job] = []
        self._stopping = False
        # Set when a request arrives while a batch runs: evidence of concurrent callers, the only time waiting for
        # company can pay off. A lone caller never waits.
        self._contended = False
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        # Milliseconds per job, smoothed: the basis of the retry hint.
        self._job_ms = 1000.0
        self.steps_run = 0
        # Told of every batch that left the engines (metrics); errors in it never reach the batch's requests.
        self.on_batch: Callable[[list[Job]], None] | None = None

    def start(self) -> InferenceWorker:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self._running

    def submit(self, job: Job) -> Queued:
        with self._lock:
            if self._stopping:
                raise WorkerStopping(SHUTTING_DOWN)
            if len(self._queue) >= self.config.queue_capacity:
                raise QueueFull(self.config.queue_capacity, round(self._job_ms))
            self._queue.append(job)
            self._contended = self._contended or bool(self._running)
            queued = Queued(position=len(self._queue) - 1 + len(self._running), depth=len(self._queue))
            self._lock.notify_all()
        job.emit(queued)
        return queued

    def stop(self, timeout: float | None = None) -> None:
        """Finishes what was accepted, then ends the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if not self._queue:
                    return
                # Running from the moment it leaves the queue, so idle() never sees it in neither place.
                batch = self._running = [self._queue.popleft()]
            self._gather(batch)
            try:
                self._run(batch)
            except Exception as e:  # a shared engine call failed: these requests fail, the worker lives on
                for job in batch:
                    job.fail("running the engines", e)
                    job.settle(error=job.failure)
            finally:
                with self._lock:
                    self._running = []

    def _gather(self, batch: list[Job]) -> None:
        """Adds compatible jobs that arrive within the wait to the batch, up to the model's largest batch."""
        first = batch[0]
        if not self.config.batching:
            return
        capacity = max(first.model.batch_sizes)
        images = first.params.num_images
        until = time.monotonic() + self.config.max_batch_wait_ms / 1e3
        with self._lock:
            wait_for_company, self._contended = self._contended, False
            while images < capacity:
                for job in list(self._queue):
                    if job.batch_key == first.batch_key and images + job.params.num_images <= capacity:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.params.num_images
                remaining = until - time.monotonic()
                if images >= capacity or remaining <= 0 or not wait_for_company:
                    break
                self._lock.wait(remaining)

    @staticmethod
    def _deliver(job: Job, pixels: np.ndarray | None) -> None:
        """The per-request steps after the shared engine calls: whatever fails here fails this request alone."""
        if pixels is None or not job.proceed():
            job.settle(error=job.stop_reason())
            return
        try:
            encoded = encode_images(job.params, pixels, job.times)
        except Exception as e:
            job.fail("encoding its images", e)
            job.settle(error=job.failure)
            return
        for index, (data, mime) in enumerate(encoded):
            job.emit(ImageReady(index, data, mime))
        job.times.total_ms = (time.perf_counter() - job.accepted) * 1e3
        if job.failure is not None:  # an image event could not be delivered
            job.settle(error=job.failure)
        else:
            job.settle(GenerateResult(encoded, pixels, job.times))

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        ready = []
        for job in batch:
            # A future its caller already cancelled refuses to run; one that may not proceed never starts.
            if job.future.set_running_or_notify_cancel() and job.proceed():
                ready.append(job)
            else:  # no engine time spent on it
                job.settle(error=job.stop_reason())
        if not ready:
            return
        images = sum(job.params.num_images for job in ready)
        for job in ready:
            job.times.queue_ms = (start - job.accepted) * 1e3
            job.batch_size = images
        model = ready[0].model
        pixels = render_members(model, ready)
        self.steps_run += sum(job.steps_done for job in ready)
        if self.on_batch is not None:
            try:
                self.on_batch(ready)
            except Exception:  # an observer's bug must not fail requests whose images are made
                log.exception("batch observer failed")
        for job, job_pixels in zip(ready, pixels, strict=True):
            self._deliver(job, job_pixels)
        self._job_ms = 0.8 * self._job_ms + 0.2 * (time.perf_counter() - start) * 1e3 / len(ready)
