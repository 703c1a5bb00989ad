// Two real @slack/rtm-api@7.0.1 clients, one per region, exchanging messages and typing
// indicators and staying connected across the library's own keep-alive (ping/pong) cycle.
//
// Run by tests/mesh/real_clients.rs against an in-process mesh; configuration arrives as JSON in
// the environment variable CHANNELMESH_TEST. Prints "OK" and exits 0 on success; prints
// "FAIL: reason" and exits 1 on the first failure. Every wait has a timeout.
'use strict';

const { RTMClient, LogLevel } = require('@slack/rtm-api');

const TIMEOUT_MS = 15000;
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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

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

  async start() {
    const ready = new Promise((resolve) => this.rtm.once('ready', resolve));
    const started = await withTimeout(this.rtm.start(), `${this.name} rtm.connect + websocket`);
    if (!started || started.ok !== true || typeof started.url !== 'string') {
      fail(`${this.name}: bad rtm.connect reply ${JSON.stringify(started)}`);
    }
    await withTimeout(ready, `${this.name} 'ready'`);
    return started;
  }

  /** Resolves with the first not yet consumed received event matching `pred`. */
  expect(pred, what) {
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
    return withTimeout(found, `${this.name} did not receive ${what}`);
  }

  async disconnect() {
    this.finishing = true;
    await withTimeout(this.rtm.disconnect(), `${this.name} disconnect`);
  }
}

async function exchange(from, to, text, config) {
  const ack = await withTimeout(from.rtm.sendMessage(text, config.channel), `the ack of ${from.name}'s message`);
  if (!ack || ack.ok !== true || typeof ack.ts !== 'string') {
    fail(`${from.name}: bad ack ${JSON.stringify(ack)}`);
  }
  const got = await to.expect((e) => e.type === 'message' && e.text === text, `${from.name}'s message "${text}"`);
  if (got.ts !== ack.ts || got.user !== config[from.name] || got.channel !== config.channel) {
    fail(`${to.name} got ${JSON.stringify(got)}, which does not match ${from.name}'s ack ${JSON.stringify(ack)}`);
  }
  return ack;
}

/** Waits until `client` has sent a keep-alive ping and received a pong answering it. */
async function pingPong(client) {
  const deadline = Date.now() + TIMEOUT_MS;
  let ping;
  while (!(ping = client.sent.find((m) => m.type === 'ping'))) {
    if (Date.now() > deadline) fail(`${client.name} sent no keep-alive ping within ${TIMEOUT_MS} ms`);
    await sleep(100);
  }
  const pong = await client.expect((e) => e.reply_to === ping.id, `a reply to ping ${JSON.stringify(ping)}`);
  if (pong.type !== 'pong' || typeof pong.reply_to !== 'number') {
    fail(`${client.name}: ping ${JSON.stringify(ping)} answered with ${JSON.stringify(pong)}`);
  }
  return { ping, pong };
}

async function main() {
  const config = JSON.parse(process.env.CHANNELMESH_TEST);
  const ann = new Client('ann', config.us_east, config.ann_token);
  const bob = new Client('bob', config.eu_west, config.bob_token);
  clients.push(ann, bob);

  // 1. Connect, one per region.
  const [annStart, bobStart] = await Promise.all([ann.start(), bob.start()]);
  if (ann.rtm.activeUserId !== config.ann || bob.rtm.activeUserId !== config.bob) {
    fail(`self.id from rtm.connect: ann=${ann.rtm.activeUserId} bob=${bob.rtm.activeUserId}`);
  }
  console.log(`both clients ready (${annStart.url}, ${bobStart.url})`);

  // 2. ann -> bob: the ack has a ts, the delivery carries the same ts.
  const ack = await exchange(ann, bob, 'hello from node', config);
  console.log(`message delivered across regions with ts ${ack.ts}`);

  // 3. bob types -> ann sees user_typing.
  await withTimeout(bob.rtm.sendTyping(config.channel), 'bob sendTyping');
  const typing = await ann.expect((e) => e.type === 'user_typing', "bob's typing indicator");
  if (typing.user !== config.bob || typing.channel !== config.channel) {
    fail(`bad user_typing ${JSON.stringify(typing)}`);
  }
  console.log('typing indicator delivered');

  // 4. Keep-alive: after 6 s of silence each client pings and needs a pong with reply_to
  //    within 4 s, else it closes the socket (reported as 'disconnected', which fails the run).
  const [a, b] = await Promise.all([pingPong(ann), pingPong(bob)]);
  console.log(`keep-alive answered: ann ${JSON.stringify(a.ping)} -> ${JSON.stringify(a.pong)}, bob ${JSON.stringify(b.ping)} -> ${JSON.stringify(b.pong)}`);
  // Stay idle past the library's pong timeout, then prove the same connections still work.
  await sleep(5000);
  if (!ann.rtm.connected || !bob.rtm.connected) fail('a client is no longer connected after the ping cycle');
  const ack2 = await exchange(bob, ann, 'still here after ping', config);
  console.log(`message delivered after the keep-alive cycle with ts ${ack2.ts}`);

  // 5. Clean disconnect.
  await Promise.all([ann.disconnect(), bob.disconnect()]);
  console.log('OK');
  process.exit(0);
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
