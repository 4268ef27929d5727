"""optuna-dashboard against the service's database, read-only.

The dashboard's write routes (notes, deleting studies, ...) have no authentication, so the server
binds a loopback address unless told otherwise, and its database connection cannot write: on
SQLite it opens the file with ``mode=ro`` (a reader that never takes a write lock, so a search
writing beside it never sees "database is locked"), on PostgreSQL every transaction is read-only
(and the compose file gives it a read-only role as well).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Container
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from budgetpress.search import best_trial_of

logger = logging.getLogger(__name__)

SQLITE_READ_TIMEOUT_S = 30.0


def readonly_url(url: str) -> str:
    """The URL a read-only reader opens: for a SQLite file, its ``mode=ro`` URI form."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    if not database or database == ":memory:":
        raise ValueError(f"the dashboard needs a database file or server, not {url!r}")
    path = database.removeprefix("file:") if database.startswith("file:") else str(Path(database).resolve())
    if not Path(path).is_file():
        raise ValueError(f"no SQLite database at {path}; run a search first or give --storage URL")
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def _engine_kwargs(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_READ_TIMEOUT_S}}
    if backend == "postgresql":
        return {"connect_args": {"options": "-c default_transaction_read_only=on"}}
    return {}


_CONSTRAINT_PREFIX = "constraints:"


def with_constraints(trial: FrozenTrial) -> FrozenTrial:
    """The trial as optuna-dashboard 0.21 shows constraints: Optuna 5 stores each one as the system
    attribute ``constraints:NAME``; the dashboard reads a list under ``constraints``. The named
    values are also shown as user attributes (``memory_over_budget``: bytes over the budget)."""
    named = {
        k.removeprefix(_CONSTRAINT_PREFIX): v for k, v in trial.system_attrs.items() if k.startswith(_CONSTRAINT_PREFIX)
    }
    if not named:
        return trial
    view = copy.copy(trial)
    view.system_attrs = {**trial.system_attrs, "constraints": [named[k] for k in sorted(named)]}
    view.user_attrs = {**{k: v for k, v in named.items()}, **trial.user_attrs}
    return view


class ReadOnlyStorage(RDBStorage):
    """An RDB storage opened read-only whose trials show their constraints to optuna-dashboard."""

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return with_constraints(super().get_trial(trial_id))

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return [with_constraints(t) for t in super().get_all_trials(study_id, deepcopy=deepcopy, states=states)]

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        """The dashboard's "best trial": the search's own pick (feasible, at the highest fidelity
        measured), not Optuna's lowest value, which may be the over-budget dense reference. With no
        feasible trial yet, Optuna's pick: the dashboard asks only once a trial is complete, and
        its page needs one."""
        best = best_trial_of(super().get_all_trials(study_id, deepcopy=False))
        return with_constraints(best if best is not None else super().get_best_trial(study_id))


def readonly_storage(url: str) -> RDBStorage:
    """An Optuna storage on ``url`` that reads and never writes (nor creates tables)."""
    ro_url = readonly_url(url)
    try:
        return ReadOnlyStorage(ro_url, engine_kwargs=_engine_kwargs(ro_url), skip_table_creation=True)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ModuleNotFoundError) as error:
        raise ValueError(f"cannot open storage {url!r} read-only: {error}") from error


def check_host(host: str, *, expose: bool) -> None:
    """Refuse a non-loopback address unless ``expose`` (the dashboard has no authentication)."""
    if expose or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the dashboard has no authentication; it binds 127.0.0.1, not {host!r}, unless --expose "
            "says that the address is on a private network"
        )


def dashboard_app(storage_url: str, artifact_root: Path | None = None) -> Any:
    """The dashboard's WSGI application over a read-only storage, with the plot artifacts if any."""
    from optuna_dashboard import wsgi

    store = None
    if artifact_root is not None and artifact_root.is_dir():
        store = FileSystemArtifactStore(str(artifact_root))
    return wsgi(readonly_storage(storage_url), artifact_store=store)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def serve_dashboard(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_root: Path | None = None,
    expose: bool = False,
) -> None:
    """Serve the dashboard (one thread per request) until interrupted."""
    check_host(host, expose=expose)
    app = dashboard_app(storage_url, artifact_root)
    with make_server(host, port, app, server_class=_Server, handler_class=_Handler) as server:
        logger.info("optuna-dashboard on http://%s:%d/dashboard/ (read-only: %s)", host, port, storage_url)
        server.serve_forever()
