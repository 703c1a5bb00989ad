"""The web app's side of replication, with a real grpcio admin client: how complete `History`
is, and a `PostMessage` retried with its idempotency key across a channel server's failover.

Run by tests/mesh/replication.rs; configuration arrives as JSON in CHANNELMESH_TEST and the step
as the first argument:

    complete   posts past a channel's history bound (100 events) and a few to another channel:
               the first answers a non-empty `complete_after_ts` (the last ts trimmed), the
               other "".
    post       posts `text` with `key`; prints `ts TS`.
    retry      posts `text` with `key` again (retrying while the channel moves, as a web app
               whose call failed would), wants the ts `want_ts`, and `History` to hold that
               message exactly once.

Prints OK last on success; exits non-zero with a reason on the first failure.
"""

import json
import os
import sys
import time

import channelmesh_admin

# How long a retry keeps trying while the channel's new owner takes over.
RETRY_FOR = 30.0
HISTORY_BOUND = 100


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def history(stub, pb, auth, channel):
    """Every retained event of `channel`, oldest first, and its `complete_after_ts`."""
    events, since, complete_after = [], "", None
    while True:
        page = stub.History(pb.HistoryRequest(channel=channel, since_ts=since, limit=1000), metadata=auth)
        events += page.events
        if complete_after is None:
            complete_after = page.complete_after_ts
        if not page.has_more or not page.events:
            return events, complete_after
        since = page.events[-1].ts


def complete(config, grpc, pb, stub, auth):
    trimmed, intact = config["trimmed_channel"], config["intact_channel"]
    posted = []
    for i in range(HISTORY_BOUND + 5):
        reply = stub.PostMessage(pb.PostMessageRequest(channel=trimmed, user="UWEBAPP", text=f"t{i}"), metadata=auth)
        posted.append(reply.ts)
    for i in range(3):
        stub.PostMessage(pb.PostMessageRequest(channel=intact, user="UWEBAPP", text=f"i{i}"), metadata=auth)
    events, complete_after = history(stub, pb, auth, trimmed)
    if not complete_after:
        fail(f"{trimmed}: {len(events)} events after {len(posted)} posts, and complete_after_ts is empty")
    if complete_after != posted[len(posted) - len(events) - 1]:
        fail(f"{trimmed}: complete_after_ts {complete_after}, want the last trimmed ts {posted[len(posted) - len(events) - 1]}")
    if not all(e.ts > complete_after for e in events):
        fail(f"{trimmed}: an event at or before complete_after_ts {complete_after}")
    print(f"{trimmed}: {len(events)} of {len(posted)} kept, complete after {complete_after}", flush=True)
    events, complete_after = history(stub, pb, auth, intact)
    if complete_after != "" or len(events) != 3:
        fail(f"{intact}: complete_after_ts {complete_after!r} with {len(events)} events, want '' with 3")
    print(f"{intact}: complete from the start", flush=True)


def post(config, grpc, pb, stub, auth):
    request = pb.PostMessageRequest(
        channel=config["channel"], user="UWEBAPP", text=config["text"], idempotency_key=config["key"]
    )
    print(f"ts {stub.PostMessage(request, metadata=auth).ts}", flush=True)


def retry(config, grpc, pb, stub, auth):
    channel = config["channel"]
    request = pb.PostMessageRequest(channel=channel, user="UWEBAPP", text=config["text"], idempotency_key=config["key"])
    deadline = time.monotonic() + RETRY_FOR
    while True:
        try:
            reply = stub.PostMessage(request, metadata=auth, timeout=10)
            break
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                fail(f"the retry: {e.code()} {e.details()}")
            if time.monotonic() > deadline:
                fail(f"the retry still failed after {RETRY_FOR}s: {e.code()} {e.details()}")
            print(f"the retry: {e.code()}, again", flush=True)
            time.sleep(0.2)
    if reply.ts != config["want_ts"]:
        fail(f"the retry was answered ts {reply.ts}, the first post {config['want_ts']}")
    events, complete_after = history(stub, pb, auth, channel)
    same = [e for e in events if json.loads(e.event_json).get("text") == config["text"]]
    if [e.ts for e in same] != [config["want_ts"]]:
        fail(f"History holds the message as {[e.ts for e in same]}, want once as {config['want_ts']}")
    # A floor from before the post (a slot taken over while the mesh started) covers nothing
    # acknowledged; one at or after it would say the post may be missing.
    if complete_after != "" and complete_after >= config["want_ts"]:
        fail(f"History is complete only after {complete_after}, at or after the post {config['want_ts']}")
    print(f"retried across the failover: ts {reply.ts}, once in History", flush=True)


def main():
    step = sys.argv[1]
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    grpc, pb, stub = channelmesh_admin.connect(config["admin_addr"], config["proto_root"])
    auth = [("authorization", f"Bearer {config['admin_token']}")]
    {"complete": complete, "post": post, "retry": retry}[step](config, grpc, pb, stub, auth)
    print("OK", flush=True)


if __name__ == "__main__":
    main()
