"""k6-forward: read k6 ``--out json`` lines, aggregate per (series, bucket), send partials.

    k6-forward --run-id checkout-test -- k6 run script.js
    k6 run --out json=- script.js | k6-forward --run-id checkout-test
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import signal
import socket
import ssl
import stat
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import IO, Any

from common import protocol
from common.cli import run_loop
from common.config import ConfigError, ForwarderConfig, load
from k6_forward.child import FORWARDED_SIGNALS, ChildError, K6Child, script_of
from k6_forward.lines import LineAggregator
from k6_forward.link import LinkRefused, ServerLink
from k6_forward.route import ServerGroup
from k6_forward.thresholds import InspectFailed, check_tags, with_no_thresholds
from k6_forward.thresholds import load as inspect_thresholds
from k6_forward.verdicts import EXIT_THRESHOLDS_FAILED, GlobalVerdicts
from td_report.thresholds import Threshold, ThresholdError, parse_threshold

CHUNK_BYTES = 1 << 20
FINGERPRINT_BYTES = 64 * 1024
# Exit status when input was read to its end and sent, but some of it is not stored:
# lines that were not samples of k6's JSON, or samples the servers refused.
EXIT_INCOMPLETE = 3
IDLE_FLUSH_SECONDS = 2.0
# No final global verdict in --verdict-timeout: not every generator had ended and been
# written (as td-report --wait's timeout).
EXIT_NO_VERDICT = 4
K6_EXIT_INTERRUPTED = 105  # k6 stopped by a signal: ours, on a global abortOnFail

DESCRIPTION = """\
Forward k6's metrics to td-server and non-td-server.

Run k6 under it (first form): k6 writes its JSON output into a pipe of the forwarder's
own, and its banner, progress and summary reach the terminal unchanged. Ctrl-C and
SIGTERM go to k6, which ends the test as it does alone (teardown, summary); the forwarder
then sends everything, waits for the servers' acknowledgements and exits with k6's exit
status, or 99 when a threshold failed over all generators (below). Or read k6 JSON from
files or a pipe (second form)."""

EPILOG = """\
Trend metrics go to td-server as t-digest partials; counters, gauges and rates go to
non-td-server as sums. A bucket's partial is sent once event time (the k6 timestamps)
has moved LOCAL_GRACE seconds past its end, when input has been idle for 2 s, and at end
of input; stragglers are sent as further partials. The forwarder exits 0 once the
servers say everything it read is in the database (at most --commit-timeout after they
have logged it all).

It never drops data. Every frame is kept until its server says it is in the database,
not only in its log: it is resent after a reconnect (capped exponential backoff), and
to the next server of the role after a failover, so a server whose disk is lost loses
nothing; the servers and the rows drop duplicates. While a
server is away, frames are held in memory up to --max-unacked-bytes, then in a spool
file up to --max-spool-bytes; when both are full it stops reading its input and k6
waits on the pipe. Lines it cannot use (not JSON, unknown metric type, a point before
its Metric line, a bad time, a non-finite or huge value, a NUL character in the metric
or a grouped tag, a line cut off at the end) are reported with their line number,
counted and skipped; the last line sums them up. k6's own text in the stream (banner,
progress, summary) is harmless and only counted; a JSON line that k6's progress output
cut in two is put back together. Tag values longer than 256 characters (long URLs in
k6's name tag) are shortened to 239 characters, "~" and 16 hex digits of their hash.

several servers per role: --td A:7410,B:7410 (and --non-td likewise) shares the series
among them: each series goes to one server, chosen by a hash of the series and the
servers' addresses, so every forwarder given the same list (in any order) sends it to
the same server. A server unreachable for --failover-after seconds has its series, and
the partials it never got, sent to the next server in hash order; when it is back, new
buckets go to it again. Frames it may have logged before it went away wait for it.

global thresholds: under the first form, the script's thresholds (read with
'k6 inspect', which gets the run's -e, --config and system environment) and any
--threshold are judged by the servers over ALL generators of the run, cumulatively from
its start, each time they write the run's buckets; k6 runs with --no-thresholds. A failed
abortOnFail threshold (after its delayAbortEval) stops k6 on every generator as Ctrl-C
does (teardown and summary run). At the end the forwarder waits for the final verdict
(every generator ended and written, at most --verdict-timeout) and prints one line per
threshold. In the second form, --threshold flags are judged the same way, without abort.

exit status (under the first form, a non-zero status of k6 comes first: 107 for a
script error, 105 for an interrupted test, ...):
  0    every sample read was stored and every global threshold passed
  1    an error stopped it (input unreadable, a server refused this forwarder)
  2    bad configuration, or a malformed --threshold
  3    it ran to the end, but some lines were lost, some samples refused by the
       servers, or bucket rows holding its samples refused by the database (kept in a
       server's quarantine file): the last line says how many, and why
  4    no final global verdict within --verdict-timeout (a generator had not ended)
  99   a global threshold failed (over all generators), as k6 run
"""


def _enlarge_pipe(fd: int) -> None:
    """Let a pipe hold CHUNK_BYTES, so that one read can take a whole chunk.

    A pipe holds 64 KiB by default, so each read of k6's output would return at most
    that. Linux only; where it fails, reads just stay smaller.
    """
    try:
        import fcntl  # noqa: PLC0415 - not on every platform

        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK_BYTES)
    except (ImportError, OSError, ValueError):
        pass


def _open(path: str | int) -> IO[bytes]:
    if isinstance(path, int):  # a pipe from a k6 started by this forwarder
        _enlarge_pipe(path)
        return open(path, "rb")  # noqa: SIM115 - closed by the caller
    if path == "-":
        with contextlib.suppress(AttributeError, OSError, ValueError):
            _enlarge_pipe(sys.stdin.fileno())
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - closed by the caller


async def read_chunks(paths: Sequence[str | int]) -> AsyncIterator[bytes | None]:
    """Yield input chunks; yield None when no input arrived for IDLE_FLUSH_SECONDS."""
    loop = asyncio.get_running_loop()
    for path in paths or ["-"]:
        stream = _open(path)
        read = getattr(stream, "read1", stream.read)
        try:
            while True:
                pending = loop.run_in_executor(None, read, CHUNK_BYTES)
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=IDLE_FLUSH_SECONDS)
                    if done:
                        break
                    yield None
                chunk = pending.result()
                if not chunk:
                    break
                yield chunk
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def fingerprint(head: bytes) -> str | None:
    """What identifies an input: BLAKE2b-128 of its first FINGERPRINT_BYTES, cut at the
    last whole line (so that it does not depend on how reads split the input), and that
    length. A live k6 run's first lines hold its timestamps: no two runs share it."""
    window = head[:FINGERPRINT_BYTES]
    window = window[:window.rfind(b"\n") + 1]
    if not window:
        return None
    return f"{hashlib.blake2b(window, digest_size=16).hexdigest()}-{len(window)}"


def feed_chunk(lines: LineAggregator, carry: bytes, chunk: bytes) -> bytes:
    """Feed the complete lines of carry + chunk; return the incomplete rest (the new carry)."""
    if not carry:
        return lines.feed_buffer(chunk)
    # Complete the carried line on its own, rather than copy the whole chunk behind it.
    end = chunk.find(b"\n") + 1
    if not end:
        return carry + chunk
    lines.feed_buffer(carry + chunk[:end])
    return lines.feed_buffer(memoryview(chunk)[end:])


def client_security(config: ForwarderConfig) -> tuple[ssl.SSLContext | None, str | None]:
    """TLS context and token from the config; unreadable files are a ConfigError."""
    tls = None
    if config.tls_ca or config.tls_cert or config.tls_key:
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        try:
            tls = ssl.create_default_context(
                cafile=str(config.tls_ca) if config.tls_ca else None)
            if config.tls_cert and config.tls_key:
                tls.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_ca {config.tls_ca}, tls_cert {config.tls_cert}, "
                              f"tls_key {config.tls_key}: {exc}") from None
    token = None
    if config.token_file:
        try:
            token = config.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token_file {config.token_file}: {exc.strerror}") from None
    return tls, token


def check_tag_keys(keys: tuple[str, ...], limits: protocol.Limits) -> None:
    """The servers would refuse every sample for tag keys past their limits: say so now."""
    if len(keys) > limits.max_tags:
        raise ConfigError(f"tags: {len(keys)} keys, the servers accept {limits.max_tags}")
    for key in keys:
        problem = protocol.text_problem(key)
        if problem or len(key) > limits.max_tag_length:
            raise ConfigError(f"tags: key {key[:40]!r} "
                              f"{problem or f'is longer than {limits.max_tag_length} chars'}")


class Forwarder:
    def __init__(self, config: ForwarderConfig, run_id: str, producer: str) -> None:
        self.config = config
        tag_keys = tuple(k.strip() for k in config.tags.split(",") if k.strip())
        check_tag_keys(tag_keys, protocol.Limits())
        self.tag_keys = tag_keys
        self.lines = LineAggregator(tag_keys, config.bucket_seconds)
        tls, token = client_security(config)
        def group(name: str, role: str, addresses: Sequence[tuple[str, int]]) -> ServerGroup:
            several = len(addresses) > 1
            return ServerGroup(name, [
                ServerLink(name, address, producer, run_id, role, config.max_unacked_bytes,
                           spool_dir=config.spool_dir, max_spool_bytes=config.max_spool_bytes,
                           tls=tls, token=token, append=config.append,
                           spool_name=f"{role}.{index}" if several else role)
                for index, address in enumerate(addresses)], config.failover_after)

        self.td = group("td-server", protocol.ROLE_TD, config.td)
        self.non_td = group("non-td-server", protocol.ROLE_NON_TD, config.non_td)
        self.items_sent = 0
        self.started_at = time.time()
        self.k6_version: str | None = None  # known when k6 runs as the child
        self.script: str | None = None

    async def send(self, closed: tuple[list[Any], list[Any]]) -> None:
        trends, counters = closed
        if trends:
            await self.td.send_items([protocol.trend_item(p) for p in trends])
        if counters:
            await self.non_td.send_items([protocol.counter_item(p) for p in counters])
        self.items_sent += len(trends) + len(counters)

    async def run(self, paths: Sequence[str | int]) -> None:
        chunks = read_chunks(paths)
        # The servers learn what this input is before its first frame, so that they can
        # refuse a run fed the same input twice; idle input starts the links regardless.
        head: list[bytes | None] = []
        async for chunk in chunks:
            head.append(chunk)
            if chunk is None or sum(map(len, filter(None, head))) >= FINGERPRINT_BYTES:
                break
        input_id = fingerprint(b"".join(filter(None, head)))
        started = protocol.Generator(0, "start", self.started_at, socket.gethostname(),
                                     self.k6_version, self.script)
        for link in (self.td, self.non_td):
            link.input_id = input_id
            link.start()
            await link.send_generator(started)
        carry = b""
        grace = self.config.local_grace

        async def all_chunks() -> AsyncIterator[bytes | None]:
            for chunk in head:
                yield chunk
            async for chunk in chunks:
                yield chunk

        async for chunk in all_chunks():
            if chunk is None:
                await self.send(self.lines.close_all())
                continue
            carry = feed_chunk(self.lines, carry, chunk)
            await self.send(self.lines.close_ready(grace))
        if carry.strip():
            # k6 was cut off mid-line: the fragment is reported and counted, not parsed.
            self.lines.lines += 1
            self.lines.skip(self.lines.lines, "truncated_line",
                            f"input ended inside a line ({len(carry)} bytes without newline)")
        self.lines.finish()
        await self.send(self.lines.close_all())
        # Logged is enough here: the servers close the run's buckets early once every
        # generator has ended, so finish() waits for them to be stored.
        await self.td.wait_logged()
        await self.non_td.wait_logged()

    async def finish(self, exit_status: int | None) -> None:
        """Tell both servers this generator has ended (after all its data is logged), so
        that the run knows its span and td-report --wait knows when it is complete; then
        wait until every frame is in the database."""
        lines = self.lines
        ended = protocol.Generator(0, "end", time.time(), exit_status=exit_status,
                                   first_ns=lines.first_ns, last_ns=lines.last_ns,
                                   samples=lines.samples, units=dict(lines.units) or None)
        for link in (self.td, self.non_td):
            await link.send_generator(ended)
        await self.td.wait_logged()
        await self.non_td.wait_logged()
        limit = self.config.commit_timeout
        try:
            async with asyncio.timeout(limit):
                await self.td.wait_acked()
                await self.non_td.wait_acked()
        except TimeoutError:
            held = self.td.unacked_frames + self.non_td.unacked_frames
            print(f"k6-forward: after {limit:g} s (--commit-timeout), {held} frames are "
                  "logged by the servers but not yet said to be in the database; they are "
                  "in the servers' write-ahead logs and are stored when those write them "
                  "(lost only if a server's disk is lost first)", file=sys.stderr, flush=True)

    @property
    def refused_samples(self) -> Counter[str]:
        return self.td.refused_samples + self.non_td.refused_samples

    @property
    def quarantined_rows(self) -> int:
        return self.td.quarantined_rows + self.non_td.quarantined_rows

    @property
    def complete(self) -> bool:
        """Every line was used or harmless, and the servers stored every sample."""
        return not self.lines.skipped and not self.refused_samples \
            and not (self.td.refused_items + self.non_td.refused_items) \
            and not self.quarantined_rows

    def summary(self) -> str:
        lines = self.lines
        skipped = sum(lines.skipped.values())
        refused = self.refused_samples
        stored = lines.samples - sum(refused.values())
        text = (f"k6-forward: done: {lines.lines} lines read; {lines.samples} samples read, "
                f"{stored} stored, {sum(refused.values())} refused by the servers"
                + _reasons(refused) + f"; {skipped} lines lost" + _reasons(lines.skipped)
                + f"; {lines.text_lines} lines of k6 text ignored")
        if lines.rejoined:
            text += f"; {lines.rejoined} lines cut by k6's progress output rejoined"
        if lines.tags_shortened:
            text += (f"; {lines.tags_shortened} tag values longer than "
                     f"{lines.limits.max_tag_length} characters shortened")
        if self.quarantined_rows:
            text += (f"; {self.quarantined_rows} bucket rows holding some of them refused by "
                     "the database and quarantined by the servers")
        return text + f"; {self.items_sent} partials acknowledged"


def _reasons(counts: Counter[str]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + ")"


def main(argv: Sequence[str] | None = None) -> int:
    def extra(parser: Any) -> None:
        parser.add_argument("inputs", nargs="*", metavar="FILE",
                            help="k6 JSON files (.gz accepted); default: standard input")
        parser.add_argument("--threshold", action="append", default=[], metavar="THRESHOLD",
                            help="a global threshold 'METRIC[{tag:value}]: EXPRESSION', "
                                 "judged over all generators besides the script's own "
                                 "(repeatable)")
        parser.usage = ("%(prog)s [options] -- k6 run [k6 options] SCRIPT\n"
                        "       %(prog)s [options] [FILE ...]")
        parser.epilog = EPILOG

    own, k6_command = split_command(list(sys.argv[1:] if argv is None else argv))
    config, args = load(ForwarderConfig, "k6-forward", DESCRIPTION, own, extra=extra)
    if k6_command and args.inputs:
        print("k6-forward: error: give either FILEs or -- k6 run ..., not both",
              file=sys.stderr)
        return 2
    run_id = config.run_id or f"run-{uuid.uuid4().hex[:12]}"
    problem = protocol.text_problem(run_id)
    if problem or len(run_id) > protocol.Limits.max_name_length:
        print(f"k6-forward: error: run_id {run_id[:60]!r} "
              f"{problem or f'is longer than {protocol.Limits.max_name_length} characters'}",
              file=sys.stderr)
        return 2
    if not config.run_id:
        print(f"k6-forward: run id {run_id}", file=sys.stderr, flush=True)
    producer = uuid.uuid4().hex
    try:
        forwarder = Forwarder(config, run_id, producer)
    except ConfigError as exc:
        print(f"k6-forward: error: {exc}", file=sys.stderr)
        return 2
    child = K6Child(k6_command) if k6_command else None
    if child is None and config.local_thresholds:
        print("k6-forward: error: --local-thresholds applies to the '-- k6 run' form only",
              file=sys.stderr)
        return 2

    async def go() -> int:
        inputs: list[str | int] = list(args.inputs)
        try:
            verdicts = await global_thresholds(forwarder, child, args.threshold)
        except (ChildError, ThresholdError, OSError) as exc:
            print(f"k6-forward: error: {exc}", file=sys.stderr)
            return 2
        if child is not None:
            forwarder.script = script_of(child.argv)
            forwarder.k6_version = await child.version()
            try:
                inputs = [await child.start()]
            except (ChildError, OSError) as exc:
                print(f"k6-forward: error: {exc}", file=sys.stderr)
                return 2
            loop = asyncio.get_running_loop()
            for sig in FORWARDED_SIGNALS:
                loop.add_signal_handler(sig, on_signal, child, verdicts, sig)
        final = False
        try:
            await forwarder.run(inputs)
            k6_status = await child.wait() if child is not None else None
            await forwarder.finish(k6_status)
            # k6's own failure (a script error, a Ctrl-C) decides the exit status: no
            # need to wait for the other generators then.
            own_failure = bool(k6_status) and (verdicts is None or verdicts.aborted_by is None)
            if verdicts is not None and not own_failure:
                final = await wait_final(verdicts, config.verdict_timeout)
        except LinkRefused as exc:
            print(f"k6-forward: error: {exc}", file=sys.stderr)
            return await stop_child(child, 1)
        except OSError as exc:
            print(f"k6-forward: error: cannot read input: {exc}", file=sys.stderr)
            return await stop_child(child, 1)
        finally:
            await forwarder.td.close()
            await forwarder.non_td.close()
        print(forwarder.summary(), file=sys.stderr, flush=True)
        aborted = verdicts is not None and verdicts.aborted_by is not None
        if verdicts is not None:
            print("\n".join(verdicts.lines()), file=sys.stderr, flush=True)
        if k6_status and not (aborted and k6_status == K6_EXIT_INTERRUPTED):
            # k6's own status (107: script error, 105: interrupted, ...) comes first
            return k6_status
        if verdicts is not None:
            if aborted or (final and verdicts.failed):
                return EXIT_THRESHOLDS_FAILED
            if not final:
                print(f"k6-forward: error: no final global verdict within "
                      f"{config.verdict_timeout:g} s (--verdict-timeout): not every generator "
                      f"of the run had ended and been written", file=sys.stderr, flush=True)
                return EXIT_NO_VERDICT
        if not forwarder.complete:
            print("k6-forward: error: not every sample read was stored (see the counts "
                  "above and the lines reported before them)", file=sys.stderr, flush=True)
            return EXIT_INCOMPLETE
        return 0

    return run_loop(go())


async def global_thresholds(forwarder: Forwarder, child: K6Child | None,
                            extra: Sequence[str]) -> GlobalVerdicts | None:
    """Read the run's thresholds (the script's, by k6 inspect, and --threshold), have the
    servers judge them over all generators, and run k6 with --no-thresholds."""
    config = forwarder.config
    if child is not None and not config.local_thresholds:
        try:
            thresholds = await inspect_thresholds(child.argv, extra)
        except InspectFailed as exc:
            # k6 run fails the same way (a script that does not compile: k6's message
            # and status 107), and is recorded as a generator that ran.
            print(f"k6-forward: 'k6 inspect' cannot read the script's options (exit "
                  f"{exc.status}); k6 run says why below", file=sys.stderr, flush=True)
            return None
    else:
        thresholds = [parse_threshold(text) for text in extra]
    if not thresholds:
        return None
    check_tags(thresholds, forwarder.tag_keys)
    if child is not None:
        child.argv = with_no_thresholds(child.argv)

    def on_abort(threshold: Threshold, result: dict[str, Any]) -> None:
        observed = result.get("observed")
        print(f"k6-forward: global threshold {threshold.text!r} failed over all generators "
              f"(observed {observed!r}) and has abortOnFail: "
              + ("stopping k6 (its teardown and summary still run)" if child is not None
                 else "stop the test (k6 reads into a pipe here; this forwarder cannot)"),
              file=sys.stderr, flush=True)
        if child is not None and not child.signals_passed:
            child.pass_signal(signal.SIGINT)

    verdicts = GlobalVerdicts(thresholds, config.strict_thresholds, on_abort)
    frame = protocol.thresholds([(t.text, t.abort_on_fail, t.delay_abort_eval)
                                 for t in thresholds])
    for link, role in ((forwarder.td, protocol.ROLE_TD), (forwarder.non_td,
                                                          protocol.ROLE_NON_TD)):
        link.thresholds_frame = frame

        def receive(message: dict[str, Any], role: str = role) -> None:
            verdicts.receive(role, message)

        link.on_verdicts = receive
    print(f"k6-forward: {len(thresholds)} thresholds, judged over all generators by the "
          f"servers" + (" (k6 runs with --no-thresholds)" if child is not None else ""),
          file=sys.stderr, flush=True)
    return verdicts


def on_signal(child: K6Child, verdicts: GlobalVerdicts | None, sig: int) -> None:
    """Ctrl-C or SIGTERM goes to k6; once k6 has ended, it stops the wait for the final
    global verdict instead."""
    if child.process is not None and child.process.returncode is not None:
        if verdicts is not None:
            verdicts.give_up()
        return
    child.pass_signal(sig)


async def wait_final(verdicts: GlobalVerdicts, limit: float) -> bool:
    if not verdicts.is_final:
        print(f"k6-forward: waiting up to {limit:g} s for the final global verdict "
              f"(every generator of the run ended and written)", file=sys.stderr, flush=True)
    return await verdicts.wait_final(limit)


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the forwarder's own arguments, the k6 command after the first --)."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


async def stop_child(child: K6Child | None, status: int) -> int:
    """The forwarder cannot go on: stop k6 the way it stops itself, then exit."""
    if child is not None:
        child.pass_signal(signal.SIGTERM)
        await child.wait()
    return status


if __name__ == "__main__":
    sys.exit(main())
