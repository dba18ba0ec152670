"""Where tdagg keeps its rows: one interface (common.store.base), one backend per store,
chosen by the DSN's scheme."""

from __future__ import annotations

from common.redact import redact_dsn
from common.store.base import (
    BucketWriter,
    RowsRefused,
    SchemaMissing,
    Store,
    StoreError,
    StoreUnavailable,
    StoreView,
    is_permanent,
)
from common.store.rows import BucketKey, Policies

__all__ = ["BucketKey", "BucketWriter", "Policies", "RowsRefused", "SchemaMissing", "Store",
           "StoreError", "StoreUnavailable", "StoreView", "SCHEMES", "is_permanent",
           "open_store", "scheme_of"]

SCHEMES = ("postgresql://", "postgres://", "memory://", "clickhouse://", "chdb://")


def scheme_of(dsn: str) -> str:
    """'postgresql' for '' (the PG* variables) and for a libpq key=value string."""
    head, sep, _ = dsn.partition("://")
    return head.lower() if sep else "postgresql"


def open_store(dsn: str, label: str | None = None) -> Store:
    """The store a DSN names (not connected yet: call ``open``). ``label`` names it in
    messages (default: the DSN without its password)."""
    scheme = scheme_of(dsn)
    if label is None:
        label = redact_dsn(dsn) if dsn else "from PG* environment variables"
    if scheme in ("postgresql", "postgres"):
        from common.store.postgres import PostgresStore  # noqa: PLC0415 - only when used

        return PostgresStore(dsn, label)
    if scheme == "memory":
        from common.store.memory import MemoryStore  # noqa: PLC0415

        return MemoryStore(dsn.partition("://")[2].strip("/"))
    if scheme in ("clickhouse", "chdb"):
        from common.store.clickhouse import ClickHouseStore  # noqa: PLC0415

        return ClickHouseStore(dsn, label)
    raise StoreError(f"unknown database scheme {scheme + '://'!r}: expected one of "
                     f"{', '.join(SCHEMES)}")
