// Two real @slack/rtm-api@7.0.1 clients of one user, of two teams, on one gateway: the web app
// disconnects the user's team T1 (DisconnectUser, called by the test once this script prints
// "CONNECTED"); the T1 client's WebSocket gets the close code and reason, the T2 client stays
// connected and receives what is posted to the user afterwards (the test posts "after the
// disconnect" once this script prints "CLOSED").
//
// Run by tests/mesh/admin_connections.rs against an in-process mesh; configuration arrives as
// JSON in the environment variable CHANNELMESH_TEST. Prints "OK" and exits 0 on success; prints
// "FAIL: reason" and exits 1 on the first failure. Every wait has a timeout.
'use strict';

const { RTMClient, LogLevel } = require('@slack/rtm-api');

const TIMEOUT_MS = 15000;
const OVERALL_TIMEOUT_MS = 60000;

function fail(msg) {
  console.log(`FAIL: ${msg}`);
  process.exit(1);
}

process.on('unhandledRejection', (err) => fail(`unhandled rejection: ${err && err.stack ? err.stack : err}`));
setTimeout(() => fail(`the script did not finish within ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS).unref();

function withTimeout(promise, what, ms = TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** An unmodified RTMClient, started; resolves once it is ready. */
async function started(name, baseUrl, token) {
  const rtm = new RTMClient(token, { slackApiUrl: baseUrl, autoReconnect: false, logLevel: LogLevel.ERROR });
  const ready = new Promise((resolve) => rtm.once('ready', resolve));
  await withTimeout(rtm.start(), `${name} rtm.connect + websocket`);
  await withTimeout(ready, `${name} 'ready'`);
  return rtm;
}

/** The close code and reason the client's own WebSocket (the library's `ws`) receives. */
function closeOf(rtm) {
  return new Promise((resolve) => {
    rtm.websocket.once('close', (code, reason) => resolve({ code, reason: reason.toString('utf8') }));
  });
}

async function main() {
  const config = JSON.parse(process.env.CHANNELMESH_TEST);
  const t1 = await started('t1', config.base, config.t1_token);
  const t2 = await started('t2', config.base, config.t2_token);
  const t1Closed = closeOf(t1);
  const t2Closed = closeOf(t2);
  let t2Gone = false;
  t2Closed.then(() => { t2Gone = true; });
  const after = new Promise((resolve) => {
    t2.on('message', (event) => { if (event.text === 'after the disconnect') resolve(event); });
  });
  console.log('CONNECTED');

  const closed = await withTimeout(t1Closed, 'the T1 client closed by the disconnect');
  console.log(`CLOSED ${closed.code} ${closed.reason}`);
  if (closed.code !== config.code || closed.reason !== config.reason) {
    fail(`the T1 client was closed with ${JSON.stringify(closed)}, not ${config.code} ${JSON.stringify(config.reason)}`);
  }
  const event = await withTimeout(after, "the T2 client's message after the disconnect");
  if (t2Gone || event.channel !== config.user) fail(`the T2 client: gone=${t2Gone}, ${JSON.stringify(event)}`);
  await withTimeout(t2.disconnect(), 't2 disconnect');
  console.log('OK');
  process.exit(0);
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
