"""The batching scheduler: one thread owns every decoding Batch; requests (Jobs) queue, join a
running Batch at a step boundary, and get their tokens back as events on their event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from ..engine.config import EngineConfig
from ..engine.decoding import Batch, Seq
from ..engine.errors import DecodingError, SolverError
from ..engine.fuser import Fuser
from ..engine.members import ModelSet
from ..engine.sampling import SamplingParams
from ..engine.solvers import Solver
from .events import Delta, Done, Event, Failed, Started, request_param
from .metrics import Metrics
from .protocol import INTERNAL, APIError
from .tracker import Tracker

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request as the scheduler sees it, settled on the event loop: its model, solver, sampling
    and engine settings (the recipe's: speculation, caches). Its events (events.py) go to
    `events` on the request's event loop."""

    model: str
    fuser: Fuser
    key: tuple
    solver: Solver
    prompt: str
    params: SamplingParams
    stream: bool
    logprobs: int | None  # None: no logprobs; k: the chosen token plus k alternatives
    return_weights: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    models: ModelSet | None = None  # what it decodes with (fusion.experts: fewer experts); None: the fuser's
    engine: EngineConfig | None = None  # how its batch decodes; None: the fuser's (its recipe's)
    state: str = "pending"  # pending | active | finished
    seq: Seq | None = None
    tracker: Tracker | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: bool = False

    def __post_init__(self):
        if self.models is None:
            self.models = self.fuser.models
        if self.engine is None:
            self.engine = self.fuser.engine

    @property
    def trace(self) -> bool:  # weights and top alternatives come from the engine's trace
        return self.return_weights or bool(self.logprobs)

    @property
    def batch_key(self) -> tuple:
        """The Batch it may share: same model, solver (and experts) and engine settings."""
        return self.model, self.key, self.engine

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class Scheduler:
    """One thread owns every Batch. Each round: apply cancellations, admit waiting requests into
    their (model, solver) Batch (prefill, joining at this step boundary), step every Batch once
    and hand each request its new tokens; finished sequences leave their Batch at its next step."""

    def __init__(self, max_batch: int, max_queue: int, metrics: Metrics):
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: set[Job] = set()
        self._cancels: list[Job] = []
        self._batches: dict[tuple, Batch] = {}
        self._members: dict[tuple, list[Job]] = defaultdict(list)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- event loop side

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="logitfusion-scheduler", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def healthy(self) -> bool:
        """Alive, or not started yet: before the app's lifespan starts it, nothing has failed."""
        return self.alive or self._thread is None

    def submit(self, job: Job) -> None:
        if self._thread is None:
            self.start()
        with self._cond:
            if not self.alive:
                raise Unavailable()
            if len(self._pending) + len(self._active) >= self.max_batch + self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop a waiting request, or finish a running one at the next step."""
        with self._cond:
            if job.state == "pending":
                try:
                    self._pending.remove(job)
                except ValueError:
                    pass
                job.state = "finished"
            elif job.state == "active":
                self._cancels.append(job)
                self._cond.notify()

    def gauges(self) -> dict[str, tuple[str, float]]:
        with self._cond:
            pending, active = len(self._pending), len(self._active)
            batches = sum(1 for b in self._batches.values() if len(b))
        return {"logitfusion_queue_depth": ("Requests waiting for a decoding slot.", pending),
                "logitfusion_active_sequences": ("Sequences being decoded.", active),
                "logitfusion_running_batches": ("Batches (one per model and solver in use) with rows.", batches),
                "logitfusion_max_batch": ("Configured decoding slots.", self.max_batch),
                "logitfusion_max_queue": ("Configured queue length beyond the slots.", self.max_queue),
                "logitfusion_scheduler_up": ("1 while the scheduler thread runs.", 1.0 if self.alive else 0.0)}

    # -- scheduler thread

    def _run(self) -> None:
        import torch
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._pending or self._active or self._cancels):
                        self._cond.wait()
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                    free = max(0, self.max_batch - len(self._active))
                    admit = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
                    for job in admit:
                        job.state = "active"
                        self._active.add(job)
                try:
                    for job in cancels:
                        if job.state == "active":
                            if job.seq is not None:
                                job.seq.cancel()  # its row leaves its Batch at the next step
                            self._retire(job, "cancelled")
                    self._admit(admit)
                    self._step_all()
                except Exception:  # a bug: never let the thread die silently with requests waiting
                    log.exception("scheduler round failed; failing the requests it was serving")
                    for key in list(self._batches):
                        self._fail_batch(key)
                    for job in admit:  # admitted but never started: answer them, free their slots
                        if job.state == "active":
                            self._fail(job, INTERNAL)
        self._shutdown()

    def _retire(self, job: Job, reason: str) -> None:
        with self._cond:
            self._active.discard(job)
            job.state = "finished"
        with self.metrics.lock:
            self.metrics.finished[(job.model, reason)] += 1

    def _fail(self, job: Job, error: APIError) -> None:
        if job.seq is not None:
            job.seq.cancel()
        self._retire(job, "error")
        job.emit(Failed(error))

    def _admit(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for job in jobs:
            groups[(job.batch_key, job.trace)].append(job)
        for (bkey, trace), group in groups.items():
            self._join(bkey, group, trace)

    def _prefill_error(self, job: Job, e: Exception) -> APIError:
        """A request's 400 for what its prefill raised. Prefill checks (and tokenises) the prompt
        against every model it runs: an engine error that names no sampling field is the prompt's."""
        if not isinstance(e, (DecodingError, SolverError)):  # e.g. the tokenizer or torch choked on it
            return self._request_error(job, e, "prefilled")
        param = request_param(e)
        if param is None:
            return APIError(400, str(e), param="prompt", code="invalid_prompt")
        return APIError(400, str(e), param=param, code="invalid_request")

    def _request_error(self, job: Job, e: Exception, stage: str) -> APIError:
        log.error("request for %s could not be %s", job.model, stage, exc_info=e)
        return APIError(400, f"this request could not be {stage} ({type(e).__name__}); check its prompt and "
                        "parameters (the server log has the details)", code="invalid_request")

    def _join(self, bkey: tuple, jobs: list[Job], trace: bool) -> None:
        """Prefill `jobs` (which checks and tokenises their prompts, once) and merge them into
        their Batch. A prefill failure leaves the running rows untouched: with one request it is
        that request's 400; with several they are retried one by one, so that only the request
        that causes it fails."""
        fuser = jobs[0].fuser
        try:
            # The job's engine settings (the recipe's speculation) apply here as in `generate`:
            # greedy output is unchanged, sampled output keeps its distribution.
            batch = self._batches.get(bkey)
            if batch is None:
                batch = Batch(jobs[0].models, jobs[0].solver, jobs[0].engine)
            joining = batch.prefill([j.prompt for j in jobs], [j.params for j in jobs], trace=trace)
        except Exception as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._join(bkey, [job], trace)
                return
            self._fail(jobs[0], self._prefill_error(jobs[0], e))
            return
        self._batches[bkey] = batch
        try:
            seqs = batch.join(joining)
        except Exception:  # merging caches is ours alone: a bug, and the batch may be inconsistent
            log.exception("joining the batch of %s failed", bkey[0])
            for job in jobs:
                self._fail(job, INTERNAL)
            self._fail_batch(bkey)
            return
        for job, seq in zip(jobs, seqs):
            job.seq = seq
            job.tracker = Tracker(job, fuser.models.tokenizer)
            self._members[bkey].append(job)
            job.emit(Started(seq.prompt_tokens))
        with self.metrics.lock:
            self.metrics.prompt_tokens[bkey[0]] += sum(seq.prompt_tokens for seq in seqs)

    def _step_all(self) -> None:
        for bkey in list(self._batches):
            batch = self._batches[bkey]
            if not len(batch):
                del self._batches[bkey]
                self._members.pop(bkey, None)
                continue
            rows = len(batch)
            try:
                emitted = batch.step()
            except Exception:
                log.exception("decoding step failed for %s", bkey)
                self._fail_batch(bkey)
                continue
            now = time.perf_counter()
            with self.metrics.lock:
                self.metrics.steps += 1
                self.metrics.rows += rows
                self.metrics.tokens[bkey[0]] += len(emitted)
            still = []
            for job in self._members.get(bkey, []):
                if job.state != "active":
                    continue  # cancelled: its row was dropped by this step
                try:
                    if self._relay(job, now):
                        still.append(job)
                except Exception:  # one request's text could not be followed: it alone fails
                    log.exception("relaying tokens of a request for %s failed", bkey[0])
                    self._fail(job, INTERNAL)
            self._members[bkey] = still

    def _relay(self, job: Job, now: float) -> bool:
        """Hand one request its new tokens after a step; False once it is done."""
        if job.seq.tokens and not job.first_token:
            job.first_token = True
            with self.metrics.lock:
                self.metrics.ttft.observe(now - job.submitted)
        needs_text = job.stream or job.logprobs is not None
        delta = job.tracker.advance() if needs_text else None
        if job.seq.done:
            self._complete(job)
            return False
        if delta is not None:
            job.emit(Delta(**delta))
        return True

    def _complete(self, job: Job) -> None:
        seq = job.seq
        gen = seq.result(job.fuser.models.tokenizer)
        rest = job.tracker.finish(gen.text)
        self._retire(job, seq.finish_reason or "length")
        job.emit(Done(gen.text, Delta(**rest), seq.finish_reason, seq.error, len(seq.tokens), seq.prompt_tokens))

    def _fail_batch(self, bkey: tuple) -> None:
        for job in self._members.pop(bkey, []):
            if job.state == "active":
                self._fail(job, INTERNAL)
        self._batches.pop(bkey, None)

    def _shutdown(self) -> None:
        with self._cond:
            jobs = list(self._pending) + list(self._active)
            self._pending.clear()
        for job in jobs:
            self._fail(job, APIError(503, "the server is shutting down", "server_error", code="shutting_down"))
        self._batches.clear()
        self._members.clear()
