"""The job runner: claims queued jobs, runs each search in a thread against one shared Ray cluster,
renews the leases of the jobs it holds, and reaps the expired leases of others. Exports are claimed,
leased and reaped the same way, beside the jobs (``ExportRunner``).

A job's progress is written to its row after every trial; a job whose row says ``cancelling`` (or
whose lease this runner lost) is stopped by raising from the progress callback, which the search
propagates (the worker pool then kills its Ray workers). Trials left running by a stopped or
crashed attempt are failed with their reason before anything else touches the study.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import IO

import ray
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from budgetpress.api._db import Database, optuna_storage_url
from budgetpress.api._export_runs import ExportRunner
from budgetpress.api._jobs import JobRecord
from budgetpress.api._locks import MODEL_WORK
from budgetpress.api._queue import claim, finish, reap, record_progress, release, renew
from budgetpress.api._requests import search_request
from budgetpress.api._settings import ServiceSettings
from budgetpress.api._tables import JobState
from budgetpress.api._trials import StudyProgress, fail_running_trials
from budgetpress.api._trialsql import study_progress
from budgetpress.dashboard import attach_finished_study_plots
from budgetpress.search import TrialRecord
from budgetpress.workers import run_search, start_ray

logger = logging.getLogger(__name__)


class JobStopped(Exception):
    """Raised from the progress callback to stop a search: cancelled, lease lost, or shutting down."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Handle:
    job: JobRecord
    thread: threading.Thread | None = None
    stop_reason: str | None = None
    holds_model_lock: bool = False

    def release_model_lock(self) -> None:
        if self.holds_model_lock:
            self.holds_model_lock = False
            MODEL_WORK.release()


class JobProgress:
    """The service's Progress: writes a job's stage, trials done and best KL to its row."""

    shows_bars = False

    def __init__(self, runner: Runner, handle: _Handle) -> None:
        self._runner = runner
        self._handle = handle

    def stage(self, text: str) -> None:
        # The search checks the request and builds the level store in this process before its
        # first other stage; from then on its model work runs in Ray workers.
        if not text.startswith("level store"):
            self._handle.release_model_lock()
        self._write(stage=text[:200])

    def trial(self, record: TrialRecord, done: int, total: int) -> None:
        progress = self._runner.progress_of(self._handle.job.study_name)
        self._write(trials_done=progress.complete, best_kl=progress.best_kl)

    def check(self) -> None:
        """Stop at once when the lease loop has seen a cancel, a lost lease or a shutdown."""
        if self._handle.stop_reason is not None:
            raise JobStopped(self._handle.stop_reason)

    def _write(self, **values: object) -> None:
        handle = self._handle
        state = record_progress(self._runner.db, job_id=handle.job.id, owner=self._runner.boot_id, **values)
        if state is None:
            handle.stop_reason = handle.stop_reason or "lease lost"
        elif state is JobState.CANCELLING:
            handle.stop_reason = "cancelled"
        if handle.stop_reason is not None:
            raise JobStopped(handle.stop_reason)


class Runner:
    """Runs up to ``settings.runner_slots`` jobs at once; ``start`` reaps and re-attaches first."""

    def __init__(self, *, db: Database, settings: ServiceSettings, boot_id: str | None = None) -> None:
        self.db = db
        self.settings = settings
        self.boot_id = boot_id or f"runner-{uuid.uuid4().hex[:16]}"
        self.storage_url = optuna_storage_url(db.url)
        self.storage = RDBStorage(self.storage_url)
        self._handles: dict[str, _Handle] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock_file: IO[str] | None = None
        self._owns_ray = False
        self.exports = ExportRunner(
            db=db, settings=settings, owner=self.boot_id, storage_url=self.storage_url, stopping=self._stopping
        )

    def start(self) -> None:
        if self.db.sqlite:
            self._lock_sqlite()
        n_cpus = self.settings.runner_slots * self.settings.workers_per_job
        env = {name: os.environ[name] for name in ("HF_HUB_OFFLINE",) if name in os.environ}
        self._owns_ray = start_ray(n_cpus, env)
        self.reap()
        for target, name in ((self._claim_loop, "claim"), (self._lease_loop, "lease")):
            thread = threading.Thread(target=target, name=f"{self.boot_id}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("runner %s started with %d slot(s)", self.boot_id, self.settings.runner_slots)

    def _lock_sqlite(self) -> None:
        """With SQLite exactly one runner process claims work: hold a lock file beside the database."""
        database = make_url(self.db.url).database
        if not database or database == ":memory:":
            return
        self._lock_file = open(f"{database}.runner.lock", "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self._lock_file.close()
            raise ValueError(
                f"another runner already works on {database}; SQLite takes one runner (use PostgreSQL for several)"
            ) from error

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop claiming, stop running searches at their next trial, and give their jobs back."""
        self._stopping.set()
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.stop_reason = handle.stop_reason or "runner shutting down"
        for thread in [*self._threads, *(h.thread for h in handles if h.thread is not None)]:
            thread.join(timeout_s)
        self.exports.stop(timeout_s)
        self.storage.engine.dispose()
        if self._owns_ray:
            ray.shutdown()
        if self._lock_file is not None:
            self._lock_file.close()

    def progress_of(self, study_name: str) -> StudyProgress:
        """Complete trials and the best KL of a study: one aggregate query, however many trials."""
        with self.db.read_connection() as connection:
            return study_progress(connection, study_name)

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    def reap(self) -> None:
        """Return expired work to the queue; fail what cancelled or failed jobs left running."""
        for item in reap(self.db, max_attempts=self.settings.max_attempts):
            if item.state is not JobState.QUEUED:
                fail_running_trials(self.storage, item.study_name, item.state.value)
        self.exports.reap()

    def claim_one(self) -> bool:
        """Claim and start one job if a slot is free; True if one was started."""
        with self._lock:
            if len(self._handles) >= self.settings.runner_slots or self._stopping.is_set():
                return False
            job = claim(self.db, owner=self.boot_id, lease_s=self.settings.lease_s)
            if job is None:
                return False
            handle = _Handle(job=job)
            self._handles[job.id] = handle
        handle.thread = threading.Thread(target=self._execute, args=(handle,), name=f"job-{job.id}", daemon=True)
        handle.thread.start()
        return True

    def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                started = self.claim_one()
                started = self.exports.claim_one() or started
            except Exception:  # a database hiccup must not end the loop; it is logged and retried
                logger.exception("runner %s: claiming a job failed; retrying", self.boot_id)
                started = False
            if not started:
                self._stopping.wait(self.settings.poll_s)

    def _lease_loop(self) -> None:
        period = self.settings.lease_s / 3
        while not self._stopping.wait(period):
            try:
                self._renew()
                self.reap()
            except Exception:  # as above: logged, retried at the next period
                logger.exception("runner %s: renewing leases failed; retrying", self.boot_id)

    def _renew(self) -> None:
        with self._lock:
            handles = dict(self._handles)
        self.exports.renew()
        held = renew(self.db, owner=self.boot_id, job_ids=list(handles), lease_s=self.settings.lease_s)
        for job_id, handle in handles.items():
            if job_id not in held:
                handle.stop_reason = handle.stop_reason or "lease lost"
            elif held[job_id] is JobState.CANCELLING:
                handle.stop_reason = handle.stop_reason or "cancelled"

    def _execute(self, handle: _Handle) -> None:
        job = handle.job
        try:
            self._run(handle)
        finally:
            with self._lock:
                self._handles.pop(job.id, None)

    def _run(self, handle: _Handle) -> None:
        job = handle.job
        resume = self._study_exists(job.study_name)
        fail_running_trials(self.storage, job.study_name, f"abandoned by an earlier attempt of job {job.id}")
        logger.info("job %s: attempt %d%s", job.id, job.attempts, " (resuming its study)" if resume else "")
        try:
            request = search_request(job, self.settings, storage=self.storage_url, resume=resume)
            MODEL_WORK.acquire()
            handle.holds_model_lock = True
            report = run_search(request, JobProgress(self, handle))
        except JobStopped as stopped:
            self._stopped(handle, stopped.reason)
        except Exception as error:  # any failure of the search ends the job failed, with its reason
            logger.exception("job %s failed", job.id)
            fail_running_trials(self.storage, job.study_name, f"job failed: {error}")
            finish(self.db, job_id=job.id, owner=self.boot_id, state=JobState.FAILED, reason=_one_line(error))
        else:
            progress = self.progress_of(job.study_name)
            record_progress(
                self.db, job_id=job.id, owner=self.boot_id, trials_done=progress.complete, best_kl=progress.best_kl
            )
            # Before the job reads succeeded, so that a succeeded job's study has its plots.
            attach_finished_study_plots(self.storage_url, job.study_name)
            final = finish(
                self.db, job_id=job.id, owner=self.boot_id, state=JobState.SUCCEEDED, report=report.to_dict()
            )
            logger.info("job %s: %s", job.id, final.value if final else "lost before it finished")
        finally:
            handle.release_model_lock()

    def _stopped(self, handle: _Handle, reason: str) -> None:
        job = handle.job
        logger.info("job %s stopped: %s", job.id, reason)
        if reason == "cancelled":
            fail_running_trials(self.storage, job.study_name, "cancelled")
            finish(self.db, job_id=job.id, owner=self.boot_id, state=JobState.CANCELLED)
        elif reason == "runner shutting down":
            fail_running_trials(self.storage, job.study_name, "interrupted: the runner shut down")
            release(self.db, job_id=job.id, owner=self.boot_id)

    def _study_exists(self, name: str) -> bool:
        try:
            self.storage.get_study_id_from_name(name)
        except KeyError:
            return False
        return True


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:2000]
