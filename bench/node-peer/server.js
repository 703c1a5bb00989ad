// A second peer for bench/compare.sh (NODE_PEER=1): the common in-process pub/sub pattern on
// Node's `ws` — a map of channel -> sockets, each message JSON-encoded once and sent to every
// member socket — speaking the part of Slack's RTM the load generator uses, so the load
// generator drives it with the same client code as channelmesh:
//
//   POST /api/rtm.connect (Authorization: Bearer <HS256 JWT, channelmesh's claims>)
//     -> {"ok":true,"url":"ws://.../ws?ticket=..."}
//   WebSocket: {"type":"hello"}; a {"id","type":"message","channel","text"} frame is acked
//   {"ok":true,"reply_to":id,"ts","text"} and sent as {"type":"message",...} to the channel's
//   other members; {"type":"ping","id"} gets a pong.
//
// One process, one thread, no history, no slow-consumer limit: what a small team writes first.
//
//   CHANNELMESH_JWT_SECRET=... node server.js 127.0.0.1:4700

'use strict';
const crypto = require('crypto');
const http = require('http');
const { WebSocketServer } = require('ws');

const [host, port] = (process.argv[2] || '127.0.0.1:4700').split(':');
const secret = process.env.CHANNELMESH_JWT_SECRET;
if (!secret) {
  console.error('CHANNELMESH_JWT_SECRET must be set');
  process.exit(2);
}

const channels = new Map(); // channel -> Set of sockets
const tickets = new Map(); // one-time ticket -> claims
let seq = 0;

// The claims of an HS256 token signed with the secret and not expired, else null.
function verify(token) {
  const [header, payload, signature] = token.split('.');
  if (!header || !payload || !signature) return null;
  const expected = crypto.createHmac('sha256', secret).update(`${header}.${payload}`).digest();
  const given = Buffer.from(signature, 'base64url');
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  try {
    const claims = JSON.parse(Buffer.from(payload, 'base64url'));
    return claims.exp > Date.now() / 1000 ? claims : null;
  } catch {
    return null;
  }
}

const server = http.createServer((req, res) => {
  req.resume();
  res.setHeader('content-type', 'application/json');
  if (req.method !== 'POST' || req.url !== '/api/rtm.connect') {
    res.statusCode = 404;
    res.end('{"ok":false,"error":"unknown_method"}');
    return;
  }
  const auth = req.headers.authorization || '';
  const claims = auth.startsWith('Bearer ') ? verify(auth.slice(7)) : null;
  if (!claims) {
    res.end('{"ok":false,"error":"invalid_auth"}');
    return;
  }
  const ticket = crypto.randomBytes(16).toString('hex');
  tickets.set(ticket, claims);
  setTimeout(() => tickets.delete(ticket), 30_000).unref();
  res.end(JSON.stringify({ ok: true, url: `ws://${host}:${port}/ws?ticket=${ticket}` }));
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 64 * 1024 });
server.on('upgrade', (req, socket, head) => {
  const ticket = new URL(req.url, 'http://peer').searchParams.get('ticket');
  const claims = tickets.get(ticket);
  tickets.delete(ticket);
  if (!claims) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => connected(ws, claims));
});

function connected(ws, claims) {
  const mine = Array.isArray(claims.channels) ? claims.channels : [];
  for (const channel of mine) {
    let members = channels.get(channel);
    if (!members) channels.set(channel, (members = new Set()));
    members.add(ws);
  }
  ws.on('close', () => {
    for (const channel of mine) channels.get(channel)?.delete(ws);
  });
  ws.on('message', (data, isBinary) => {
    let frame;
    try {
      frame = isBinary ? null : JSON.parse(data);
    } catch {
      frame = null;
    }
    if (!frame || typeof frame !== 'object') {
      ws.send('{"type":"error","error":{"code":1,"msg":"send JSON text frames"}}');
      return;
    }
    if (frame.type === 'ping') {
      ws.send(JSON.stringify({ type: 'pong', reply_to: frame.id }));
      return;
    }
    const members = channels.get(frame.channel);
    if (frame.type !== 'message' || typeof frame.text !== 'string' || !members?.has(ws)) {
      ws.send(JSON.stringify({ ok: false, reply_to: frame.id, error: { code: 2, msg: 'not a message to one of your channels' } }));
      return;
    }
    const ts = `${Math.floor(Date.now() / 1000)}.${String(++seq % 1_000_000).padStart(6, '0')}`;
    ws.send(JSON.stringify({ ok: true, reply_to: frame.id, ts, text: frame.text }));
    const event = JSON.stringify({ type: 'message', channel: frame.channel, user: claims.sub, text: frame.text, ts });
    for (const member of members) {
      if (member !== ws && member.readyState === 1) member.send(event);
    }
  });
  ws.send('{"type":"hello"}');
}

server.listen(Number(port), host, () => console.log(`listening on ${host}:${port}`));
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
