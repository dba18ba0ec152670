# syntax=docker/dockerfile:1
# One image for every tdagg program (td-server, non-td-server, k6-forward, td-report,
# ...); docker-compose.yml runs both servers from it with different commands.
# Build: docker build -t tdagg .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The context is what .dockerignore leaves: pyproject.toml, README.md and the packages.
WORKDIR /src
COPY . .
# The same venv path as the systemd installation (docs/DEPLOY.md). No 'embedded' extra:
# a container always gets its database through TDAGG_DSN.
RUN python -m venv /opt/tdagg \
 && /opt/tdagg/bin/pip install . \
 && rm -rf /src

# An unprivileged user owning the state directory (write-ahead log and dedup table).
# Mount a volume on /var/lib/tdagg/state so that the log outlives the container.
RUN useradd --system --user-group --uid 10001 --home-dir /var/lib/tdagg \
        --shell /usr/sbin/nologin tdagg \
 && install -d -o tdagg -g tdagg -m 0700 /var/lib/tdagg /var/lib/tdagg/state

ENV PATH=/opt/tdagg/bin:$PATH \
    HOME=/var/lib/tdagg \
    TDAGG_DATA_DIR=/var/lib/tdagg \
    TDAGG_STATE_DIR=/var/lib/tdagg/state
WORKDIR /var/lib/tdagg
USER 10001:10001

# 7410 td-server, 7411 non-td-server (forwarders); 9410, 9411 their /metrics and /healthz.
EXPOSE 7410 7411 9410 9411
# SIGTERM writes every open bucket before exit: give it time (docker stop -t 120).
STOPSIGNAL SIGTERM
# Inside a container the loopback defaults would be unreachable: listen on all interfaces.
# non-td-server: docker run ... tdagg non-td-server --listen 0.0.0.0:7411 \
#   --metrics-listen 0.0.0.0:9411
CMD ["td-server", "--listen", "0.0.0.0:7410", "--metrics-listen", "0.0.0.0:9410"]
