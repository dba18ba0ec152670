"""The HTTP target the k6 scripts in this folder hit: keep-alive HTTP/1.1 on 127.0.0.1.

Routes: ``/slow*`` answers after a lognormal delay (median about 7 ms), ``/sleep/MS``
after MS milliseconds, ``/error*`` 500, ``/missing*`` 404, anything else 200 at once.
Prints its port on stdout once listening.

    python -m common.harness.target [PORT]
"""

from __future__ import annotations

import asyncio
import random
import sys
from typing import cast

import uvloop

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ERROR = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom"
MISSING = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"


class Http(asyncio.Protocol):
    """One connection: requests parsed from the byte stream, answered in order of
    readiness (k6 sends the next request on a connection only after the answer)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            parts = buffer[:end].split(b" ", 2)
            path = parts[1] if len(parts) > 1 else b"/"
            buffer = buffer[end + 4:]
            delay = 0.0
            response = OK
            if path.startswith(b"/slow"):
                delay = random.lognormvariate(-5.0, 0.7)
            elif path.startswith(b"/sleep/"):
                delay = int(path.split(b"/")[2] or 0) / 1000
            elif path.startswith(b"/error"):
                response = ERROR
            elif path.startswith(b"/missing"):
                response = MISSING
            if delay:
                asyncio.get_running_loop().call_later(delay, self.reply, response)
            else:
                self.reply(response)
        self.buffer = buffer

    def reply(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))


if __name__ == "__main__":
    main()
