"""A web app's boot endpoint (aiohttp), for the gateway's boot from the web app (issue 18).

Run by tests/mesh/boot.rs. Configuration arrives as JSON in CHANNELMESH_TEST:
  {"secret": "...", "users": {"U1": {"channels": ["C1"], "name": "ann"},
                              "U5K": {"count": 5000, "prefix": "CB"}},
   "default": {"count": 100, "prefix": "CX"}}
(`count`/`prefix` make the channels PREFIX00000, PREFIX00001, …). It binds 127.0.0.1:0 and
prints `listening on PORT`, then serves:

  POST /boot     the boot endpoint: checks X-Channelmesh-Signature (HMAC-SHA256 of the raw
                 body with the secret, compared in constant time) and refuses a bad or missing
                 one with 401; answers {"channels": [...], "name": ...} for a configured user,
                 the `default` channels (none unless given) for another. Its behaviour follows /control.
  POST /control  {"mode": "ok" | "slow" | "error" | "garbage", "delay_s": N}: answer normally,
                 after N seconds, with HTTP 500, or with an invalid answer.
  GET  /stats    {"requests": {user: n}, "bad_signatures": n}: signed requests per user, and
                 requests refused for their signature.
"""

import asyncio
import hashlib
import hmac
import json
import os
import sys

from aiohttp import web

SIGNATURE_HEADER = "X-Channelmesh-Signature"


def channels_of(spec):
    if "count" in spec:
        return [f"{spec['prefix']}{i:05d}" for i in range(spec["count"])]
    return spec.get("channels", [])


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    secret = config["secret"].encode()
    users = {
        user: {"channels": channels_of(spec), **({"name": spec["name"]} if "name" in spec else {})}
        for user, spec in config.get("users", {}).items()
    }
    default = channels_of(config.get("default", {}))
    state = {"mode": "ok", "delay_s": 0.0, "requests": {}, "bad_signatures": 0}

    async def boot(request):
        body = await request.read()
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        got = request.headers.get(SIGNATURE_HEADER, "")
        if not hmac.compare_digest(expected, got):
            state["bad_signatures"] += 1
            return web.json_response({"error": "bad signature"}, status=401)
        asked = json.loads(body)
        user = asked["user"]
        if not isinstance(asked.get("team"), str):
            return web.json_response({"error": "no team"}, status=400)
        state["requests"][user] = state["requests"].get(user, 0) + 1
        mode = state["mode"]
        if mode == "slow":
            await asyncio.sleep(state["delay_s"])
        if mode == "error":
            return web.json_response({"error": "down for maintenance"}, status=500)
        if mode == "garbage":
            return web.json_response({"channels": ["C1", "not a channel id"]})
        return web.json_response(users.get(user, {"channels": default}))

    async def control(request):
        asked = await request.json()
        state["mode"] = asked["mode"]
        state["delay_s"] = float(asked.get("delay_s", 0))
        return web.json_response({"ok": True})

    async def stats(_request):
        return web.json_response(
            {"requests": state["requests"], "bad_signatures": state["bad_signatures"]}
        )

    async def serve():
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/boot", boot)
        app.router.add_post("/control", control)
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(f"listening on {port}", flush=True)
        # Until killed (the test kills it when dropped, or to take the web app down).
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
