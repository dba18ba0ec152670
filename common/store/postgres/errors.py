"""asyncpg's errors as the store's: unavailable, refused data, no schema, or other."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from common.store.base import RowsRefused, SchemaMissing, StoreError, StoreUnavailable

# Errors of a write that retrying the same batch cannot cure: the database refuses the
# data itself (class 22: bad characters, numbers or times; 23: a constraint; 54: a limit
# such as an index row too big). Anything else (connection lost, server shutting down,
# disk full, lock or serialization conflicts, timeouts, a schema another release changed)
# may pass later.
_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
)
# Not reachable now: the connection, the server's state, or resources.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


def translate(exc: BaseException, label: str) -> BaseException:
    """The store error for a driver error; anything else unchanged."""
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        return SchemaMissing(f"the database {label} has no trend_buckets or counter_buckets "
                             f"table: no td-server or non-td-server has written to it")
    if isinstance(exc, _REFUSED):
        return RowsRefused(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"database {label}: {type(exc).__name__}: "
                                f"{exc or 'no answer'}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"database {label}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError) and "dsn" in str(exc).lower():
        return StoreUnavailable(f"database {label}: {exc}")
    return exc


@contextlib.contextmanager
def translated(label: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = translate(exc, label)
        if mapped is exc:
            raise
        raise mapped from exc
