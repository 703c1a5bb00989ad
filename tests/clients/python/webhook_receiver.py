"""A web app's webhook endpoint, as the tests (and anyone trying the webhooks) run it.

    CHANNELMESH_WEBHOOK_SECRET=... tests/.venv/bin/python tests/clients/python/webhook_receiver.py [--port 0]

Prints the port it listens on (127.0.0.1) as its first line, then serves:

- POST /webhook: a delivery. Its `X-Channelmesh-Signature` must be `sha256=<hex of
  HMAC-SHA256(secret, raw body)>` with the secret in CHANNELMESH_WEBHOOK_SECRET, else it is
  counted and answered 401. While failing (POST /fail), a signed delivery is counted and
  answered with the failure's status, its events not recorded. Otherwise every event is
  recorded with its arrival time and the body's `time_ms`, and answered 200.
- GET /events: {"events": [every event recorded, in arrival order, each with `arrival_ms`,
  `body_time_ms` and `request` (the delivery's number) added], "requests": deliveries,
  "bad_signatures": n, "failed": deliveries answered with a failure, "bad_bodies": n}.
- POST /fail?status=503: answer every delivery with that status from now on.
- POST /recover: accept deliveries again.
- POST /secret (body: the new secret): check signatures with it from now on.
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
import time

from aiohttp import web

SIGNATURE_HEADER = "X-Channelmesh-Signature"


class Receiver:
    def __init__(self, secret: bytes):
        self.secret = secret
        self.events = []
        self.requests = 0
        self.bad_signatures = 0
        self.bad_bodies = 0
        self.failed = 0
        self.failing = None

    def signed(self, body: bytes, header: str) -> bool:
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, header or "")

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrival_ms = time.time() * 1000.0
        self.requests += 1
        if not self.signed(body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        if self.failing is not None:
            self.failed += 1
            return web.Response(status=self.failing, text="failing on purpose")
        try:
            parsed = json.loads(body)
            events = parsed["events"]
            body_time_ms = parsed["time_ms"]
            assert isinstance(events, list) and isinstance(body_time_ms, int)
            assert request.content_type == "application/json"
        except (ValueError, KeyError, TypeError, AssertionError):
            self.bad_bodies += 1
            return web.Response(status=400, text="bad body")
        for event in events:
            event["arrival_ms"] = arrival_ms
            event["body_time_ms"] = body_time_ms
            event["request"] = self.requests
            self.events.append(event)
        return web.Response(status=200, text="ok")

    async def get_events(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "events": self.events,
                "requests": self.requests,
                "bad_signatures": self.bad_signatures,
                "bad_bodies": self.bad_bodies,
                "failed": self.failed,
            }
        )

    async def fail(self, request: web.Request) -> web.Response:
        self.failing = int(request.query.get("status", "503"))
        return web.Response(text="failing")

    async def recover(self, _request: web.Request) -> web.Response:
        self.failing = None
        return web.Response(text="recovered")

    async def set_secret(self, request: web.Request) -> web.Response:
        secret = await request.read()
        if not secret:
            return web.Response(status=400, text="an empty secret")
        self.secret = secret
        return web.Response(text="secret changed")


async def start(port: int) -> None:
    secret = os.environ.get("CHANNELMESH_WEBHOOK_SECRET", "").encode()
    if not secret:
        sys.exit("CHANNELMESH_WEBHOOK_SECRET is not set")
    receiver = Receiver(secret)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/webhook", receiver.webhook)
    app.router.add_get("/events", receiver.get_events)
    app.router.add_post("/fail", receiver.fail)
    app.router.add_post("/recover", receiver.recover)
    app.router.add_post("/secret", receiver.set_secret)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(bound, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import asyncio

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start(args.port))
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
