"""Two real slack_sdk RTM v2 clients, one per region, plus a real grpcio admin client.

Run by tests/real_clients.rs against an in-process mesh; configuration arrives as JSON in the
environment variable CHANNELMESH_TEST. Exits non-zero with a reason on the first failure.
"""

import json
import os
import queue
import sys
import time

from slack_sdk.rtm_v2 import RTMClient

import channelmesh_admin

TIMEOUT = 15.0


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


class Client:
    """An unmodified rtm_v2 client that records every event it gets."""

    def __init__(self, name, base_url, token):
        self.name = name
        self.events = queue.Queue()
        self.rtm = RTMClient(token=token, base_url=base_url, auto_reconnect_enabled=False)

        @self.rtm.on("*")
        def record(client, event):
            self.events.put(event)

    def connect(self):
        self.rtm.connect()
        self.expect(lambda e: e.get("type") == "hello", "hello")

    def expect(self, pred, what):
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"{self.name} did not receive {what} within {TIMEOUT}s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if pred(event):
                return event

    def close(self):
        self.rtm.auto_reconnect_enabled = False
        self.rtm.close()


def admin_stub(config):
    """The repo's admin proto compiled with grpc_tools, dialled with grpcio."""
    return channelmesh_admin.connect(config["admin_addr"], config["proto_root"])


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    channel = config["channel"]
    ann = Client("ann", config["us_east"], config["ann_token"])
    bob = Client("bob", config["eu_west"], config["bob_token"])
    ann.connect()
    bob.connect()
    print("both clients got hello", flush=True)

    # ann -> bob: ack with ts, delivery with the same ts.
    ann.rtm.send({"id": 1, "type": "message", "channel": channel, "text": "hello from us-east"})
    ack = ann.expect(lambda e: e.get("reply_to") == 1, "the ack of message 1")
    if ack.get("ok") is not True or not isinstance(ack.get("ts"), str):
        fail(f"bad ack {ack}")
    got = bob.expect(lambda e: e.get("type") == "message" and e.get("text") == "hello from us-east", "ann's message")
    if got.get("ts") != ack["ts"] or got.get("user") != config["ann"] or got.get("channel") != channel:
        fail(f"delivery {got} does not match ack {ack}")
    print(f"message delivered across regions with ts {ack['ts']}", flush=True)

    # bob types -> ann sees user_typing.
    bob.rtm.send({"id": 2, "type": "typing", "channel": channel})
    typing = ann.expect(lambda e: e.get("type") == "user_typing", "bob's typing indicator")
    if typing.get("user") != config["bob"] or typing.get("channel") != channel:
        fail(f"bad user_typing {typing}")
    print("typing indicator delivered", flush=True)

    # The web app posts through the admin API with grpcio.
    grpc, pb, stub = admin_stub(config)
    auth = [("authorization", f"Bearer {config['admin_token']}")]
    try:
        stub.PostMessage(pb.PostMessageRequest(channel=channel, user="UWEBAPP", text="posted by the web app"))
        fail("PostMessage without a token succeeded")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail(f"PostMessage without a token: {e.code()}, want UNAUTHENTICATED")
    reply = stub.PostMessage(
        pb.PostMessageRequest(channel=channel, user="UWEBAPP", text="posted by the web app"), metadata=auth
    )
    for client in (ann, bob):
        got = client.expect(lambda e: e.get("text") == "posted by the web app", "the admin-posted message")
        if got.get("ts") != reply.ts or got.get("user") != "UWEBAPP":
            fail(f"{client.name} got {got}, want ts {reply.ts}")
    print(f"admin PostMessage delivered to both regions with ts {reply.ts}", flush=True)

    reaction = {
        "type": "reaction_added",
        "user": config["bob"],
        "reaction": "thumbsup",
        "item_user": config["ann"],
        "item": {"type": "message", "channel": channel, "ts": ack["ts"]},
    }
    published = stub.PublishEvent(pb.PublishEventRequest(channel=channel, event_json=json.dumps(reaction)), metadata=auth)
    for client in (ann, bob):
        got = client.expect(lambda e: e.get("type") == "reaction_added", "reaction_added")
        if got.get("reaction") != "thumbsup" or got.get("item", {}).get("ts") != ack["ts"] or got.get("event_ts") != published.ts:
            fail(f"{client.name} got {got}")
    print("admin PublishEvent reaction_added delivered to both regions", flush=True)

    history = stub.History(pb.HistoryRequest(channel=channel, limit=10), metadata=auth)
    kinds = [json.loads(e.event_json)["type"] for e in history.events]
    if kinds != ["message", "message", "reaction_added"]:
        fail(f"history holds {kinds}")
    print("history holds the three persisted events, typing excluded", flush=True)

    ann.close()
    bob.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
