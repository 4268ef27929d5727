"""API keys: random, shown once, stored as a sha256 hash, compared in constant time, revocable."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from budgetpress.api._db import Database
from budgetpress.api._tables import ApiKey, Tenant, utcnow

KEY_PREFIX = "bp_"
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KEY_SHAPE = re.compile(r"bp_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who a request comes from: the tenant of its key, never anything in the request itself."""

    tenant_id: int
    tenant_name: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant name must match {TENANT_NAME.pattern} (lower case, digits, - and _); got {name!r}")
    return name


def _tenant_id(db: Database, name: str) -> int:
    for _ in range(2):  # a concurrent creation of the same tenant wins; read it back
        with db.writing() as session:
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == name))
            if tenant_id is not None:
                return tenant_id
        try:
            with db.writing() as session:
                tenant = Tenant(name=name, created_at=utcnow())
                session.add(tenant)
                session.flush()
                return tenant.id
        except IntegrityError:
            continue
    raise RuntimeError(f"could not create tenant {name!r}")


def create_key(db: Database, tenant: str) -> str:
    """A new key for ``tenant`` (created if new); the raw key is returned once and never stored."""
    tenant_id = _tenant_id(db, check_tenant_name(tenant))
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.writing() as session:
        session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(raw), prefix=raw[:7], created_at=utcnow()))
    return raw


def revoke_key(db: Database, raw: str) -> bool:
    """Revoke a key; True if it existed and was active."""
    with db.writing() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == hash_key(raw), ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return bool(getattr(result, "rowcount", 0))


def authenticate(db: Database, raw: str) -> Caller | None:
    """The caller of an active key, or None for a malformed, unknown or revoked one."""
    if not _KEY_SHAPE.fullmatch(raw):
        return None
    digest = hash_key(raw)
    with db.reading() as session:
        row = session.execute(key_query(digest)).first()
    return caller_of(row, digest)


def key_query(digest: str) -> Select[str, datetime | None, int, str]:
    """The key's hash, revocation and tenant; routes that read a job join it to this one query."""
    return (
        select(ApiKey.key_hash, ApiKey.revoked_at, Tenant.id, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == digest)
    )


def key_query_by_param() -> Select[str, datetime | None, int, str]:
    """``key_query`` with the digest as the bound parameter ``digest``: built once, executed often."""
    return (
        select(ApiKey.key_hash, ApiKey.revoked_at, Tenant.id, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == bindparam("digest"))
    )


def caller_of(row: Any, digest: str) -> Caller | None:
    """The caller from a ``key_query`` row; None for no row or a revoked key."""
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return Caller(tenant_id=row.id, tenant_name=row.name)


def key_digest(raw: str) -> str | None:
    """The hash a well-formed key is stored under; None for a malformed one."""
    return hash_key(raw) if _KEY_SHAPE.fullmatch(raw) else None
