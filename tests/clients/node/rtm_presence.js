// Presence in the batch form with real @slack/rtm-api@7.0.1 clients: A starts with
// `batch_presence_aware: true` and subscribes to B, of the same team, with `subscribePresence`;
// B comes and goes in the other region.
//
// Run by tests/mesh/real_clients.rs against an in-process mesh; configuration arrives as JSON in
// the environment variable CHANNELMESH_TEST. Prints "OK" and exits 0 on success; prints
// "FAIL: reason" and exits 1 on the first failure. Every wait has a timeout.
'use strict';

const { RTMClient, LogLevel } = require('@slack/rtm-api');

const TIMEOUT_MS = 15000;
// The last connection's close turns into away after the grace period; allow it generously.
const AWAY_TIMEOUT_MS = 10000;
const OVERALL_TIMEOUT_MS = 90000;

const clients = [];

function fail(msg) {
  console.log(`FAIL: ${msg}`);
  for (const c of clients) {
    console.error(`--- ${c.name} received:`);
    for (const e of c.events) console.error(JSON.stringify(e));
    console.error(`--- ${c.name} sent:`);
    for (const e of c.sent) console.error(JSON.stringify(e));
  }
  process.exit(1);
}

process.on('unhandledRejection', (err) => fail(`unhandled rejection: ${err && err.stack ? err.stack : err}`));
process.on('uncaughtException', (err) => fail(`uncaught exception: ${err && err.stack ? err.stack : err}`));
setTimeout(() => fail(`the script did not finish within ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS).unref();

function withTimeout(promise, what, ms = TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** An unmodified RTMClient that records every event it receives and every frame it sends. */
class Client {
  constructor(name, baseUrl, token) {
    this.name = name;
    this.events = [];
    this.sent = [];
    this.consumed = new Set();
    this.waiters = [];
    this.finishing = false;
    this.rtm = new RTMClient(token, {
      slackApiUrl: baseUrl,
      autoReconnect: false,
      logLevel: LogLevel.ERROR,
    });
    this.rtm.on('slack_event', (_type, event) => {
      this.events.push(event);
      this.waiters = this.waiters.filter((w) => !w(this.events.length - 1));
    });
    this.rtm.on('outgoing_message', (message) => this.sent.push(message));
    // Any of these before the end means the connection was lost (e.g. a missed pong).
    for (const ev of ['reconnecting', 'disconnected', 'unable_to_rtm_start']) {
      this.rtm.on(ev, (err) => {
        if (!this.finishing) fail(`${this.name}: unexpected '${ev}' event ${err ? `(${err.message || err})` : ''}`);
      });
    }
    this.rtm.on('error', (err) => fail(`${this.name}: client error ${err && err.message}`));
  }

  /** `rtm.start(options)`: the library sends `options` to rtm.connect as form fields. */
  async start(options) {
    const ready = new Promise((resolve) => this.rtm.once('ready', resolve));
    const started = await withTimeout(this.rtm.start(options), `${this.name} rtm.connect + websocket`);
    if (!started || started.ok !== true || typeof started.url !== 'string') {
      fail(`${this.name}: bad rtm.connect reply ${JSON.stringify(started)}`);
    }
    await withTimeout(ready, `${this.name} 'ready'`);
    return started;
  }

  /** Resolves with the first not yet consumed received event matching `pred`. */
  expect(pred, what, ms = TIMEOUT_MS) {
    const take = (i) => {
      if (this.consumed.has(i) || !pred(this.events[i])) return false;
      this.consumed.add(i);
      return true;
    };
    for (let i = 0; i < this.events.length; i += 1) {
      if (take(i)) return Promise.resolve(this.events[i]);
    }
    const found = new Promise((resolve) => {
      this.waiters.push((i) => {
        if (!take(i)) return false;
        resolve(this.events[i]);
        return true;
      });
    });
    return withTimeout(found, `${this.name} did not receive ${what}`, ms);
  }

  async disconnect() {
    this.finishing = true;
    await withTimeout(this.rtm.disconnect(), `${this.name} disconnect`);
  }
}

/** A presence_change naming `user`, in either form. */
const about = (user) => (e) =>
  e.type === 'presence_change' && (e.user === user || (Array.isArray(e.users) && e.users.includes(user)));

/** The next presence_change about `user` must say `presence`, in the batch form only. */
async function expectBatch(client, user, presence, ms = TIMEOUT_MS) {
  const got = await client.expect(about(user), `a presence_change about ${user} (${presence})`, ms);
  if (got.presence !== presence) {
    fail(`${client.name} got ${JSON.stringify(got)}, want ${user} ${presence}`);
  }
  if (!Array.isArray(got.users) || got.user !== undefined) {
    fail(`${client.name} got ${JSON.stringify(got)}: not the batch form it asked for with batch_presence_aware`);
  }
  return got;
}

async function main() {
  const config = JSON.parse(process.env.CHANNELMESH_TEST);
  const a = new Client('a', config.us_east, config.a_token);
  const b = new Client('b', config.eu_west, config.b_token);
  clients.push(a, b);

  // 1. A connects asking for the batch form (sent by the library as batch_presence_aware=true)
  //    and watches B. B was never online, so the presence servers do not know B's team: A
  //    hears nothing of B yet (a client sees its own team's users only).
  await a.start({ batch_presence_aware: true });
  await withTimeout(a.rtm.subscribePresence([config.b]), 'a subscribePresence');
  const sub = a.sent.find((m) => m.type === 'presence_sub');
  if (!sub || JSON.stringify(sub.ids) !== JSON.stringify([config.b])) {
    fail(`subscribePresence sent ${JSON.stringify(sub)}`);
  }
  // The library gives the frame an id (without waiting for the reply); the server answers it.
  const reply = await a.expect((e) => e.reply_to === sub.id, `the reply to ${JSON.stringify(sub)}`);
  if (reply.ok !== true) fail(`presence_sub refused: ${JSON.stringify(reply)}`);
  console.log(`a sent ${JSON.stringify(sub)}, got ${JSON.stringify(reply)}`);

  // 2. B connects in the other region: the first thing A hears of B is B active, in the batch
  //    form.
  await b.start();
  const active = await expectBatch(a, config.b, 'active');
  console.log(`b connected on eu-west: a got ${JSON.stringify(active)}`);

  // 3. B disconnects: A sees B away, in the batch form, after the grace period.
  const closed = Date.now();
  await b.disconnect();
  const away = await expectBatch(a, config.b, 'away', AWAY_TIMEOUT_MS);
  console.log(`b disconnected: a got ${JSON.stringify(away)} after ${Date.now() - closed} ms`);

  // Exactly those two, and none in the single-user form.
  const all = a.events.filter(about(config.b));
  if (all.length !== 2) fail(`a got ${all.length} presence changes about ${config.b}, want 2`);

  await a.disconnect();
  console.log('OK');
  process.exit(0);
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
