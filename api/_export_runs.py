"""Running exports in the runner: claim a queued export, export its trial in a thread under the
model lock, archive the export directory as one tar, and record the result or the failure.

Each export goes to ``<export dir>/<export id>/`` (written atomically by the evaluators' export,
with its manifest) and its archive to ``<export dir>/<export id>.tar`` (written beside it under a
hidden name, fsynced, then renamed into place), so a killed runner leaves each absent or complete;
the reaper returns the export to the queue and the next attempt writes both again.
"""

from __future__ import annotations

import logging
import os
import secrets
import tarfile
import threading
from pathlib import Path

from budgetpress.api._db import Database
from budgetpress.api._exports import (
    ClaimedExport,
    claim_export,
    fail_export,
    reap_exports,
    release_export,
    renew_exports,
    succeed_export,
)
from budgetpress.api._locks import MODEL_WORK
from budgetpress.api._settings import ServiceSettings
from budgetpress.evaluators._export_dir import _fsync_path as fsync_path
from budgetpress.workers import export_from_study

logger = logging.getLogger(__name__)

EXPORT_SLOTS = 1  # exports hold the model lock for their whole run: a second one would only wait
ARCHIVE_SUFFIX = ".tar"


def export_path(root: Path, export_id: str) -> Path:
    return root / export_id


def archive_path(root: Path, export_id: str) -> Path:
    return root / f"{export_id}{ARCHIVE_SUFFIX}"


def write_archive(directory: Path, target: Path, *, top: str) -> int:
    """Archive ``directory``'s files under ``top/`` as one uncompressed tar at ``target``, atomically;
    its size. The archive is reproducible: sorted members, fixed owners, modes and times."""
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        with staging.open("wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_member(top, tarfile.DIRTYPE, 0o755, 0))
                for path in sorted(directory.iterdir()):
                    if path.is_symlink() or not path.is_file():
                        raise ValueError(f"export directory {str(directory)!r} holds {path.name!r}, not a file")
                    size = path.stat().st_size
                    with path.open("rb") as file:
                        tar.addfile(_member(f"{top}/{path.name}", tarfile.REGTYPE, 0o644, size), file)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(staging, target)
        fsync_path(target.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return target.stat().st_size


def _member(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ExportRunner:
    """A runner's exports: claimed, run and leased beside its jobs, under the same owner id."""

    def __init__(
        self, *, db: Database, settings: ServiceSettings, owner: str, storage_url: str, stopping: threading.Event
    ) -> None:
        self.db = db
        self.settings = settings
        self.owner = owner
        self.storage_url = storage_url
        self.root = settings.export_dir()
        self._stopping = stopping
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def running(self) -> list[str]:
        with self._lock:
            return list(self._threads)

    def claim_one(self) -> bool:
        """Claim and start one export if a slot is free; True if one was started."""
        with self._lock:
            if len(self._threads) >= EXPORT_SLOTS or self._stopping.is_set():
                return False
            claimed = claim_export(self.db, owner=self.owner, lease_s=self.settings.lease_s)
            if claimed is None:
                return False
            export_id = claimed.record.id
            thread = threading.Thread(target=self._execute, args=(claimed,), name=f"export-{export_id}", daemon=True)
            self._threads[export_id] = thread
        thread.start()
        return True

    def renew(self) -> None:
        running = self.running()
        held = renew_exports(self.db, owner=self.owner, export_ids=running, lease_s=self.settings.lease_s)
        for export_id in (set(running) - held) & set(self.running()):  # not those that just finished
            logger.warning("export %s: this runner lost its lease; its result will be dropped", export_id)

    def reap(self) -> None:
        reap_exports(self.db, max_attempts=self.settings.max_attempts)

    def stop(self, timeout_s: float) -> None:
        """Wait for running exports (an export cannot stop half-way); give back those still running."""
        with self._lock:
            threads = dict(self._threads)
        for export_id, thread in threads.items():
            thread.join(timeout_s)
            if thread.is_alive() and release_export(self.db, export_id=export_id, owner=self.owner):
                logger.info("export %s: still running at shutdown; returned to the queue", export_id)

    def _execute(self, claimed: ClaimedExport) -> None:
        try:
            self._run(claimed)
        finally:
            with self._lock:
                self._threads.pop(claimed.record.id, None)

    def _run(self, claimed: ClaimedExport) -> None:
        record = claimed.record
        logger.info("export %s: attempt %d (job %s, trial %s)", record.id, record.attempts, record.job_id, record.trial)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with MODEL_WORK:
                number, exported = export_from_study(
                    storage=self.storage_url,
                    study_name=claimed.study_name,
                    out=export_path(self.root, record.id),
                    trial=record.trial,
                    export_format=record.format,
                    root=self.root,
                    overwrite=True,  # a re-run after a lost runner replaces its complete export
                )
            size = write_archive(Path(exported.export.directory), archive_path(self.root, record.id), top=record.id)
        except Exception as error:  # any failure ends the export failed, with its reason
            logger.exception("export %s failed", record.id)
            fail_export(self.db, export_id=record.id, owner=self.owner, reason=_one_line(error))
            return
        report = exported.to_dict()
        report.pop("directory", None)  # a path on the server: not the caller's business
        recorded = succeed_export(
            self.db, export_id=record.id, owner=self.owner, trial_number=number, report=report, archive_bytes=size
        )
        logger.info("export %s: %s", record.id, "succeeded" if recorded else "lost before it finished")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:2000]
