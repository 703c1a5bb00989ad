"""Presence with real slack_sdk RTM v2 clients: A watches B while B comes and goes across regions
and devices.

Run by tests/mesh/real_clients.rs against an in-process mesh; configuration arrives as JSON in the
environment variable CHANNELMESH_TEST. Prints "OK" and exits 0 on success; prints "FAIL: reason"
and exits 1 on the first failure. Every wait has a timeout.
"""

import json
import os
import queue
import sys
import threading
import time

from slack_sdk.rtm_v2 import RTMClient

TIMEOUT = 15.0
# The last connection's close turns into away after the grace period; allow it generously.
AWAY_TIMEOUT = 10.0

clients = []


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    for client in clients:
        print(f"--- {client.name} received, in arrival order:", file=sys.stderr)
        with client.raw_lock:
            received = list(client.raw)
        for raw in received:
            print(raw, file=sys.stderr)
    sys.stderr.flush()
    # The clients' worker threads would keep the process alive; leave at once.
    os._exit(1)


class Client:
    """An unmodified rtm_v2 client; its presence_change listener feeds a queue of its own.

    rtm_v2 runs listeners on a thread pool, so events reach them in no guaranteed order; the raw
    frames (kept for failure reports) are recorded on the receiving thread, in arrival order.
    """

    def __init__(self, name, base_url, token):
        self.name = name
        self.events = queue.Queue()
        self.presence = queue.Queue()
        self.raw = []
        self.raw_lock = threading.Lock()
        self.rtm = RTMClient(
            token=token,
            base_url=base_url,
            auto_reconnect_enabled=False,
            on_message_listeners=[self.record_raw],
        )

        @self.rtm.on("*")
        def record(client, event):
            self.events.put(event)

        @self.rtm.on("presence_change")
        def on_presence_change(client, event):
            self.presence.put(event)

    def record_raw(self, message):
        with self.raw_lock:
            self.raw.append(message)

    def connect(self):
        self.rtm.connect()
        self.expect(self.events, lambda e: e.get("type") == "hello", "hello")

    def expect(self, events, pred, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"{self.name} did not receive {what} within {timeout}s")
            try:
                event = events.get(timeout=left)
            except queue.Empty:
                continue
            if pred(event):
                return event

    def expect_presence(self, user, presence, timeout=TIMEOUT):
        """The next presence_change about `user`, which must say `presence`."""
        got = self.expect(self.presence, lambda e: about(e, user), f"a presence_change about {user}", timeout)
        if got.get("presence") != presence:
            fail(f"{self.name} got {got}, want {user} {presence}")
        if got.get("user") != user or "users" in got:
            fail(f"{self.name} got {got}: not the single-user form a client without batch_presence_aware gets")
        return got

    def expect_no_presence(self, user, window):
        """No presence_change about `user` within `window` seconds (a negative check)."""
        deadline = time.monotonic() + window
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                event = self.presence.get(timeout=left)
            except queue.Empty:
                return
            if about(event, user):
                fail(f"{self.name} got {event} while {user} stayed online")

    def close(self):
        # rtm_v2.close() does not stop auto-reconnect by itself.
        self.rtm.auto_reconnect_enabled = False
        self.rtm.close()


def about(event, user):
    return event.get("type") == "presence_change" and (
        event.get("user") == user or user in (event.get("users") or [])
    )


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    watcher, watched = config["a"], config["b"]
    quiet = float(config["quiet_secs"])

    a = Client("a", config["us_east"], config["a_token"])
    clients.append(a)
    a.connect()

    # A watches B (a frame of its own through rtm_v2's send). B was never online, so the
    # presence servers do not know B's team: A hears nothing of B yet (a client sees only its
    # own team's users, and a user of no known team is one of no team).
    a.rtm.send({"id": 1, "type": "presence_sub", "ids": [watched]})
    reply = a.expect(a.events, lambda e: e.get("reply_to") == 1, "the reply to presence_sub")
    if reply.get("ok") is not True:
        fail(f"presence_sub refused: {reply}")
    print(f"{watcher} watches {watched}", flush=True)

    # B connects in the other region: the first thing A hears of B is B active.
    b1 = Client("b1", config["eu_west"], config["b_token"])
    clients.append(b1)
    b1.connect()
    a.expect_presence(watched, "active")
    print(f"{watched} connected on eu-west: {watcher} (us-east) sees active", flush=True)

    # A second device of B, on us-east; then the first (eu-west) one closes: no change, waiting
    # past the grace period so that a wrong away would have been published.
    b2 = Client("b2", config["us_east"], config["b_token"])
    clients.append(b2)
    b2.connect()
    a.expect_no_presence(watched, quiet)
    b1.close()
    a.expect_no_presence(watched, quiet)
    print(f"{watched} opened a second device and closed the first: no change within {quiet}s each", flush=True)

    # B closes the last one: away, after the grace period.
    closing = time.monotonic()
    b2.close()
    closed = time.monotonic()
    a.expect_presence(watched, "away", AWAY_TIMEOUT)
    print(
        f"{watched} closed the last device (close() took {closed - closing:.2f}s): "
        f"away {time.monotonic() - closed:.2f}s later",
        flush=True,
    )

    a.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
