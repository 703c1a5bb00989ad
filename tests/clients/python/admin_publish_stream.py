"""The web app's firehose from a real grpcio client: thousands of posts (and a few events) to
several channels over one Admin/PublishStream, a bad request in the middle, seen by a live
slack_sdk RTM v2 client.

Asserts: the first reply is id 0 with max_unanswered; every request is answered once by its id;
each channel's ts increase in the order its requests were sent; the bad request fails alone
with INVALID_ARGUMENT; the RTM client receives every message once, each channel's in send
order, with the acknowledged ts; a post resent with its idempotency key on another stream gets
the same ts; a request with id 0 or no body is refused alone; a stream without the admin token
is refused UNAUTHENTICATED.

Run by tests/mesh/admin_stream.rs against an in-process mesh; configuration arrives as JSON in
the environment variable CHANNELMESH_TEST. Prints "OK" on success; "FAIL: reason" and exits 1
on the first failure. Every wait has a timeout.
"""

import json
import os
import time

from slack_sdk.rtm_v2 import RTMClient

import channelmesh_admin
import rtm_v2_exchange
from rtm_v2_exchange import fail

# Requests on the big stream, and where the bad one goes.
TOTAL = 4000
BAD_AT = 1777
# How long the RTM client may take to receive everything.
RECEIVE_TIMEOUT = 45.0


class Client(rtm_v2_exchange.Client):
    """The exchange test's recording client, its listener run by one worker: slack_sdk runs
    listeners on a pool of 10 threads by default, which may record events out of the order
    they arrived in."""

    def __init__(self, name, base_url, token):
        super().__init__(name, base_url, token)
        self.rtm = RTMClient(token=token, base_url=base_url, auto_reconnect_enabled=False, concurrency=1)

        @self.rtm.on("*")
        def record(client, event):
            self.events.put(event)


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    grpc, pb, admin = channelmesh_admin.connect(config["admin_addr"], config["proto_root"])
    auth = [("authorization", f"Bearer {config['admin_token']}")]
    channels = config["channels"]

    client = Client("reader", config["us_east"], config["token"])
    client.connect()
    print("the RTM client got hello", flush=True)

    # What each id asked for: (channel, text or None for an event); the bad one separately.
    sent = {}

    def requests():
        for i in range(1, TOTAL + 1):
            channel = channels[i % len(channels)]
            if i == BAD_AT:
                sent[i] = ("bad channel!", "bad")
                yield pb.PublishStreamRequest(
                    id=i, post=pb.PostMessageRequest(channel="bad channel!", user="UWEBAPP", text="bad")
                )
            elif i % 500 == 0:
                event = json.dumps({"type": "firehose_event", "n": i})
                sent[i] = (channel, None)
                yield pb.PublishStreamRequest(id=i, event=pb.PublishEventRequest(channel=channel, event_json=event))
            else:
                text = f"fh {i}"
                sent[i] = (channel, text)
                key = "fh-key-7" if i == 7 else ""
                yield pb.PublishStreamRequest(
                    id=i,
                    post=pb.PostMessageRequest(channel=channel, user="UWEBAPP", text=text, idempotency_key=key),
                )

    started = time.monotonic()
    replies = list(admin.PublishStream(requests(), metadata=auth, timeout=60))
    took = time.monotonic() - started
    first, rest = replies[0], replies[1:]
    if first.id != 0 or first.max_unanswered <= 0 or first.code != 0:
        fail(f"the first reply is {first}, not id 0 with max_unanswered")
    print(f"{TOTAL} requests answered in {took:.2f}s; max_unanswered {first.max_unanswered}", flush=True)

    by_id = {}
    order = {}  # channel -> ids in reply order
    for reply in rest:
        if reply.id in by_id:
            fail(f"id {reply.id} answered twice")
        if reply.id not in sent:
            fail(f"a reply for id {reply.id}, never sent")
        by_id[reply.id] = reply
        order.setdefault(sent[reply.id][0], []).append(reply.id)
    if len(by_id) != TOTAL:
        fail(f"{len(by_id)} of {TOTAL} requests answered")
    bad = by_id[BAD_AT]
    if bad.code != grpc.StatusCode.INVALID_ARGUMENT.value[0] or bad.ts or "channel" not in bad.message:
        fail(f"the bad request's reply: {bad}")
    failed = [r for i, r in by_id.items() if i != BAD_AT and (r.code != 0 or not r.ts)]
    if failed:
        fail(f"{len(failed)} good requests failed, e.g. {failed[:3]}")
    print(f"the bad request alone failed: INVALID_ARGUMENT {bad.message}", flush=True)

    # Per channel: replies in send order, ts increasing in send order.
    acked = {}  # channel -> [(ts, text)] in send order
    for channel in channels:
        ids = order.get(channel, [])
        if ids != sorted(ids):
            fail(f"{channel}'s replies out of send order")
        ts = [by_id[i].ts for i in ids]
        floats = [float(t) for t in ts]
        if any(b <= a for a, b in zip(floats, floats[1:])):
            fail(f"{channel}'s ts do not increase in send order")
        acked[channel] = [(by_id[i].ts, sent[i][1]) for i in ids]
    print("every channel's ts increase in send order", flush=True)

    # The RTM client receives every message and event once, per channel in send order.
    want = sum(len(v) for v in acked.values())
    seen = {}
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    got = 0
    while got < want:
        left = deadline - time.monotonic()
        if left <= 0:
            fail(f"the RTM client received {got} of {want} in {RECEIVE_TIMEOUT}s")
        try:
            event = client.events.get(timeout=left)
        except Exception:
            continue
        if event.get("type") == "message" and event.get("user") == "UWEBAPP":
            seen.setdefault(event["channel"], []).append((event["ts"], event["text"]))
            got += 1
        elif event.get("type") == "firehose_event":
            channel = sent[event["n"]][0]
            seen.setdefault(channel, []).append((event["event_ts"], None))
            got += 1
    for channel in channels:
        if seen.get(channel, []) != acked[channel]:
            mine, theirs = seen.get(channel, []), acked[channel]
            diff = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            fail(
                f"{channel}: received {len(mine)}, acked {len(theirs)}; first difference at {diff}: "
                f"received {mine[max(0, diff - 2):diff + 3]}, acked {theirs[max(0, diff - 2):diff + 3]}"
            )
    print(f"the RTM client received all {want}, each channel in send order with its ts", flush=True)

    # A second stream: the idempotent post again, a request with id 0, one without a body.
    key_channel, key_text = sent[7]
    again = [
        pb.PublishStreamRequest(
            id=1, post=pb.PostMessageRequest(channel=key_channel, user="UWEBAPP", text=key_text, idempotency_key="fh-key-7")
        ),
        pb.PublishStreamRequest(id=0, post=pb.PostMessageRequest(channel=key_channel, user="UWEBAPP", text="zero")),
        pb.PublishStreamRequest(id=2),
    ]
    replies = list(admin.PublishStream(iter(again), metadata=auth, timeout=30))
    if replies[0].id != 0 or replies[0].max_unanswered != first.max_unanswered:
        fail(f"the second stream's first reply: {replies[0]}")
    answers = {(r.id, r.code): r for r in replies[1:]}
    if len(replies) != 4:
        fail(f"the second stream answered {replies}")
    if answers.get((1, 0)) is None or answers[(1, 0)].ts != by_id[7].ts:
        fail(f"the resent post got {answers.get((1, 0))}, not ts {by_id[7].ts}")
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    if (0, invalid) not in answers or (2, invalid) not in answers:
        fail(f"id 0 and an empty body are not refused alone: {replies[1:]}")
    print("a resent idempotency key got the same ts; id 0 and no body refused alone", flush=True)

    # Without the admin token, the stream is refused.
    try:
        list(admin.PublishStream(iter(again[:1]), timeout=10))
        fail("a stream without the admin token was answered")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail(f"a stream without the admin token: {e.code()}, not UNAUTHENTICATED")
    print("a stream without the admin token: UNAUTHENTICATED", flush=True)

    # A caller that cancels mid-stream: requests keep coming until the call is cancelled.
    def endless():
        i = 0
        while True:
            i += 1
            yield pb.PublishStreamRequest(
                id=i, post=pb.PostMessageRequest(channel=channels[i % len(channels)], user="UWEBAPP", text="cancelled")
            )

    call = admin.PublishStream(endless(), metadata=auth, timeout=60)
    for n, reply in enumerate(call):
        if reply.code != 0:
            fail(f"before the cancel: {reply}")
        if n == 300:
            break
    call.cancel()
    try:
        for reply in call:
            pass
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            fail(f"the cancelled call ended with {e.code()}")
    print("a stream cancelled after 300 replies", flush=True)

    client.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
