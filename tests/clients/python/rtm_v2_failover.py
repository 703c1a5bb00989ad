"""A message re-sent with its `client_msg_id` across a channel server's failover, with real
slack_sdk RTM v2 clients: delivered once, with one ts.

Run by tests/mesh/replication.rs against `channelmesh dev --multi-process`; configuration arrives
as JSON in CHANNELMESH_TEST. ann (us-east) sends a message with a `client_msg_id` and prints
`sent TS` once it is acknowledged; the test then kills the channel's owner and writes a line to
this script's stdin. ann reconnects, as a client whose connection dropped does, and re-sends the
same frame: the answer is the first ts. bob (eu-west), connected throughout, gets the message
once (the next message he gets is ann's next one) and no `history_gap`.

Prints OK last on success; exits non-zero with a reason on the first failure.
"""

import json
import os
import sys
import time

import rtm_v2_exchange
from rtm_v2_exchange import fail

# How long a message is re-sent while its channel moves.
RESEND_FOR = 30.0


class Client(rtm_v2_exchange.Client):
    """rtm_v2_exchange's recording client, for which a `history_gap` is a failure."""

    def expect(self, pred, what):
        def check(event):
            if event.get("type") == "history_gap":
                fail(f"{self.name} got {event}")
            return pred(event)

        return super().expect(check, what)


def send_until_acked(client, frame, first_id):
    """Sends `frame` (a new `id` each attempt, the same `client_msg_id`) until it is
    acknowledged; a refusal while the channel moves is answered by sending again."""
    deadline = time.monotonic() + RESEND_FOR
    attempt = first_id
    while True:
        client.rtm.send({**frame, "id": attempt})
        reply = client.expect(lambda e: e.get("reply_to") == attempt, f"the reply to {attempt}")
        if reply.get("ok") is True:
            return reply
        if time.monotonic() > deadline:
            fail(f"still refused after {RESEND_FOR}s: {reply}")
        print(f"attempt {attempt} refused ({reply}), again", flush=True)
        attempt += 1
        time.sleep(0.2)


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    channel = config["channel"]
    ann = Client("ann", config["us_east"], config["ann_token"])
    bob = Client("bob", config["eu_west"], config["bob_token"])
    ann.connect()
    bob.connect()
    frame = {"type": "message", "channel": channel, "text": "sent before the crash",
             "client_msg_id": "7b4f3c2e-1d0a-4f9e-8b7c-6a5d4e3f2a10"}
    first = send_until_acked(ann, frame, 1)
    got = bob.expect(lambda e: e.get("type") == "message", "ann's message")
    if got.get("ts") != first["ts"] or got.get("text") != frame["text"]:
        fail(f"bob got {got}, ann's ack was {first}")
    print(f"sent {first['ts']}", flush=True)

    # The test kills the channel's owner, then says so.
    if not sys.stdin.readline():
        fail("the test closed stdin before the kill")

    # ann's connection dropped (as far as ann knows): reconnect and re-send the same frame.
    ann.close()
    ann = Client("ann", config["us_east"], config["ann_token"])
    ann.connect()
    again = send_until_acked(ann, frame, 100)
    if again["ts"] != first["ts"]:
        fail(f"the re-send was answered ts {again['ts']}, the first send {first['ts']}")
    after = send_until_acked(ann, {"type": "message", "channel": channel, "text": "after the crash",
                                   "client_msg_id": "0c9d8e7f-6a5b-4c3d-2e1f-0a9b8c7d6e5f"}, 200)
    if after["ts"] <= first["ts"]:
        fail(f"the next message's ts {after['ts']} is not after {first['ts']}")
    got = bob.expect(lambda e: e.get("type") == "message", "ann's next message")
    if got.get("text") != "after the crash" or got.get("ts") != after["ts"]:
        fail(f"bob's next message is {got}, not ann's next one: the re-send was delivered again")
    print(f"re-sent across the failover: ts {again['ts']}, delivered once", flush=True)
    ann.close()
    bob.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
