"""Channel policies as real clients see them: two slack_sdk RTM v2 clients (one per region) and
a grpcio admin client.

Run by tests/mesh/policies.rs against an in-process mesh whose policy file makes
`readonly` read-only, `quiet` relay no typing and `rated` take 3 client messages at once;
configuration arrives as JSON in CHANNELMESH_TEST. Exits non-zero with a reason on the first
failure; prints OK at the end.
"""

import json
import os

import channelmesh_admin
from rtm_v2_exchange import Client, fail


def expect(client, pred, what, refuse):
    """`client`'s first event matching `pred`; fails on one matching `refuse` before it."""

    def check(event):
        if refuse(event):
            fail(f"{client.name} got {event} before {what}")
        return pred(event)

    return client.expect(check, what)


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    readonly, quiet, rated = config["readonly"], config["quiet"], config["rated"]
    ann = Client("ann", config["us_east"], config["ann_token"])
    bob = Client("bob", config["eu_west"], config["bob_token"])
    ann.connect()
    bob.connect()
    grpc, pb, stub = channelmesh_admin.connect(config["admin_addr"], config["proto_root"])
    auth = [("authorization", f"Bearer {config['admin_token']}")]

    # A read-only channel: the client's post is refused with an RTM error reply and posts
    # nothing; the web app's PostMessage succeeds and reaches both clients.
    ann.rtm.send({"id": 1, "type": "message", "channel": readonly, "text": "from a client"})
    reply = ann.expect(lambda e: e.get("reply_to") == 1, "the reply to message 1")
    want = {"ok": False, "reply_to": 1, "error": {"code": 12, "msg": "restricted_action_read_only_channel"}}
    if reply != want:
        fail(f"a post to the read-only channel got {reply}, want {want}")
    posted = stub.PostMessage(
        pb.PostMessageRequest(channel=readonly, user="UWEBAPP", text="an announcement"), metadata=auth
    )
    from_client = lambda e: e.get("text") == "from a client"
    for client in (ann, bob):
        got = expect(client, lambda e: e.get("text") == "an announcement", "the announcement", from_client)
        if got.get("ts") != posted.ts or got.get("channel") != readonly:
            fail(f"{client.name} got {got}, want ts {posted.ts} in {readonly}")
    history = stub.History(pb.HistoryRequest(channel=readonly, limit=10), metadata=auth)
    texts = [json.loads(e.event_json).get("text") for e in history.events]
    if texts != ["an announcement"]:
        fail(f"the read-only channel's history holds {texts}")
    print("read-only: the client's post refused with error 12, the admin's delivered", flush=True)

    # Typing is not relayed where the policy says so: bob types, then posts, in `quiet`; ann
    # gets the message and never the typing before it. In another channel typing is relayed.
    bob.rtm.send({"id": 2, "type": "typing", "channel": quiet})
    bob.rtm.send({"id": 3, "type": "message", "channel": quiet, "text": "typed quietly"})
    typing_in_quiet = lambda e: e.get("type") == "user_typing" and e.get("channel") == quiet
    expect(ann, lambda e: e.get("text") == "typed quietly", "bob's message in the quiet channel", typing_in_quiet)
    bob.rtm.send({"id": 4, "type": "typing", "channel": rated})
    ann.expect(
        lambda e: e.get("type") == "user_typing" and e.get("channel") == rated and e.get("user") == config["bob"],
        "bob typing in a channel that relays typing",
    )
    print("relay_typing = false: no user_typing relayed; relayed elsewhere", flush=True)

    # The publish rate: 3 at once, then error 13 for the client; the admin API is not limited.
    for i in range(10, 13):
        ann.rtm.send({"id": i, "type": "message", "channel": rated, "text": f"rated {i}"})
        ack = ann.expect(lambda e: e.get("reply_to") == i, f"the ack of message {i}")
        if ack.get("ok") is not True:
            fail(f"message {i} within the burst got {ack}")
    ann.rtm.send({"id": 13, "type": "message", "channel": rated, "text": "rated 13"})
    reply = ann.expect(lambda e: e.get("reply_to") == 13, "the reply to message 13")
    want = {"ok": False, "reply_to": 13, "error": {"code": 13, "msg": "rate_limited"}}
    if reply != want:
        fail(f"message 13 past the burst got {reply}, want {want}")
    stub.PostMessage(pb.PostMessageRequest(channel=rated, user="UWEBAPP", text="admin past the rate"), metadata=auth)
    expect(
        bob,
        lambda e: e.get("text") == "admin past the rate",
        "the admin's post past the rate",
        lambda e: e.get("text") == "rated 13",
    )
    print("publish_rate: error 13 past the burst; the admin API is not limited", flush=True)

    ann.close()
    bob.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
