"""Broadcast from a real grpcio admin client to many channels, seen by live slack_sdk RTM v2
clients in two regions: per-channel results in the order asked, a bad channel reported on its
own, a retry with the same idempotency key answered with the same ts, and bad calls refused.

Run by tests/mesh/admin_connections.rs against an in-process mesh; configuration arrives as
JSON in the environment variable CHANNELMESH_TEST. Prints "OK" on success; "FAIL: reason" and
exits 1 on the first failure. Every wait has a timeout.
"""

import json
import os
import time

import channelmesh_admin
import rtm_v2_exchange
from rtm_v2_exchange import fail


class Client(rtm_v2_exchange.Client):
    """The exchange test's recording rtm_v2 client."""

    def connect(self):
        super().connect()
        return self

    def collect(self, pred, n, what):
        """The first `n` events matching `pred` (each within the timeout)."""
        return [self.expect(pred, f"{what} ({i + 1} of {n})") for i in range(n)]


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    grpc, pb, admin = channelmesh_admin.connect(config["admin_addr"], config["proto_root"])
    auth = [("authorization", f"Bearer {config['admin_token']}")]
    channels = config["channels"]

    def refused(request, what):
        try:
            admin.Broadcast(request, metadata=auth)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                fail(f"{what}: {e.code()} {e.details()}, not INVALID_ARGUMENT")
            print(f"{what}: INVALID_ARGUMENT {e.details()}", flush=True)
            return
        fail(f"{what} was accepted")

    east = Client("east", config["us_east"], config["east_token"]).connect()
    west = Client("west", config["eu_west"], config["west_token"]).connect()

    # One message to every channel, with a bad channel id in the middle.
    asked = channels[:17] + ["bad channel!"] + channels[17:]
    request = pb.BroadcastRequest(
        channels=asked, user="UWEBAPP", text="announcement", team="T1", idempotency_key="bcast-1"
    )
    started = time.monotonic()
    reply = admin.Broadcast(request, metadata=auth)
    took = time.monotonic() - started
    results = list(reply.results)
    if [r.channel for r in results] != asked:
        fail(f"results in another order: {[r.channel for r in results]}")
    bad = results[17]
    if bad.ts or not bad.error.startswith("INVALID_ARGUMENT: "):
        fail(f"the bad channel's result: {bad}")
    good = [r for r in results if r.channel != "bad channel!"]
    if any(r.error or not r.ts for r in good):
        fail(f"failed channels: {[r for r in good if r.error or not r.ts]}")
    acked = {r.channel: r.ts for r in good}
    print(f"Broadcast to {len(asked)} channels answered in {took:.3f}s; bad one: {bad.error}", flush=True)

    # Every subscribed client gets each channel's message once, with the acknowledged ts.
    for client in (east, west):
        got = client.collect(lambda e: e.get("type") == "message" and e.get("text") == "announcement", len(channels), "announcements")
        seen = {e["channel"]: e["ts"] for e in got}
        if seen != acked:
            fail(f"{client.name} saw {seen}, acknowledged {acked}")
    print("both regions' clients got every channel's announcement with its ts", flush=True)

    # The same call again: the same ts on every channel, nothing stored twice.
    again = admin.Broadcast(request, metadata=auth)
    retried = {r.channel: r.ts for r in again.results if not r.error}
    if retried != acked:
        fail(f"a retried Broadcast answered {retried}, not {acked}")
    for channel in (channels[0], channels[-1]):
        history = admin.History(pb.HistoryRequest(channel=channel), metadata=auth)
        texts = [json.loads(e.event_json).get("text") for e in history.events]
        if texts.count("announcement") != 1:
            fail(f"{channel}'s history holds {texts}")
    print("a retried Broadcast with the same key got the same ts; stored once", flush=True)

    # An event instead of a message.
    event = json.dumps({"type": "announcement_posted", "body": "read me"})
    reply = admin.Broadcast(pb.BroadcastRequest(channels=channels[:3], event_json=event), metadata=auth)
    sent = {r.channel: r.ts for r in reply.results}
    if len(sent) != 3 or not all(sent.values()):
        fail(f"event broadcast: {reply}")
    got = east.collect(lambda e: e.get("type") == "announcement_posted", 3, "events")
    # The event goes out as given, with its event_ts: one per channel.
    seen = sorted(e["event_ts"] for e in got)
    if seen != sorted(sent.values()) or any(e.get("body") != "read me" for e in got):
        fail(f"events seen {got}, sent {sent}")
    print("an event broadcast arrived with its event_ts", flush=True)

    # Bad calls are refused whole.
    many = [f"CMANY{i}" for i in range(1001)]
    refused(pb.BroadcastRequest(channels=many, user="U1", text="x"), "1,001 channels")
    refused(pb.BroadcastRequest(channels=[channels[0], channels[0]], user="U1", text="x"), "a channel twice")
    refused(pb.BroadcastRequest(channels=[], user="U1", text="x"), "no channel")
    refused(pb.BroadcastRequest(channels=channels[:2], user="", text="x"), "an empty user")
    refused(pb.BroadcastRequest(channels=channels[:2], user="U1", text=""), "an empty text")
    refused(pb.BroadcastRequest(channels=channels[:2], user="U1", text="x", event_json=event), "a message and an event")

    east.close()
    west.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
