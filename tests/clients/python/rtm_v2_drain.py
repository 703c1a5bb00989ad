"""Real slack_sdk RTM v2 clients that ride through a region drain.

Run by tests/mesh/regions.rs next to its raw clients, against the same in-process mesh;
configuration arrives as JSON in the environment variable CHANNELMESH_TEST:
{"base_url": <us-east base URL>, "clients": [{"user", "token", "channel"}, ..]}.

Starts one RTMClient per entry, auto-reconnect on (so goodbye makes them call rtm.connect again on
the same base URL, as shipped), records the ts of every UPOSTER message in arrival order, prints
READY once every client got hello, then reads lines on stdin: REPORT prints one JSON line
{"clients": [{"user", "seen", "url", "hellos", "goodbyes", "closes"}]} (what the clients saw so
far); STOP prints that line and OK, and exits. Prints "FAIL: reason" and exits 1 on a failure;
every wait has a timeout.
"""

import json
import logging
import os
import sys
import threading
import time

from slack_sdk.rtm_v2 import RTMClient

TIMEOUT = 15.0

clients = []


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    # The clients' worker threads would keep the process alive; leave at once.
    os._exit(1)


class Client:
    """An unmodified rtm_v2 client, auto-reconnect on.

    rtm_v2 runs `@on` listeners on a thread pool, so events reach them in no guaranteed order;
    the raw frames are recorded here on the receiving thread (one per client, which reads one
    session after the other), in arrival order.
    """

    def __init__(self, user, base_url, token, channel):
        self.user = user
        self.channel = channel
        self.lock = threading.Lock()
        self.seen = []
        self.hellos = 0
        self.goodbyes = 0
        self.closes = []
        self.hello = threading.Event()
        self.rtm = RTMClient(
            token=token,
            base_url=base_url,
            auto_reconnect_enabled=True,
            on_message_listeners=[self.on_frame],
            on_close_listeners=[self.on_close],
        )

    def on_frame(self, raw):
        if not raw.startswith("{"):
            return
        event = json.loads(raw)
        kind = event.get("type")
        with self.lock:
            if kind == "message" and event.get("user") == "UPOSTER":
                self.seen.append(event["ts"])
            elif kind == "hello":
                self.hellos += 1
                self.hello.set()
            elif kind == "goodbye":
                self.goodbyes += 1

    def on_close(self, code, reason):
        with self.lock:
            self.closes.append(code)

    def connect(self):
        self.rtm.connect()

    def wait_hello(self):
        if not self.hello.wait(TIMEOUT):
            fail(f"{self.user} did not receive hello within {TIMEOUT}s")

    def report(self):
        session = self.rtm.current_session
        with self.lock:
            return {
                "user": self.user,
                "channel": self.channel,
                "seen": list(self.seen),
                "url": session.url if session is not None and session.is_active() else None,
                "hellos": self.hellos,
                "goodbyes": self.goodbyes,
                "closes": list(self.closes),
            }

    def close(self):
        # rtm_v2.close() does not stop auto-reconnect by itself (and connect() turns it back on).
        self.rtm.auto_reconnect_enabled = False
        self.rtm.close()


def main():
    # RTM_V2_LOG=DEBUG (or INFO) shows what rtm_v2 does on goodbye, on stderr.
    if os.environ.get("RTM_V2_LOG"):
        logging.basicConfig(
            level=os.environ["RTM_V2_LOG"],
            stream=sys.stderr,
            format="%(asctime)s %(threadName)s %(name)s %(message)s",
        )
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    for entry in config["clients"]:
        client = Client(entry["user"], config["base_url"], entry["token"], entry["channel"])
        clients.append(client)
        client.connect()
    for client in clients:
        client.wait_hello()
    print("READY", flush=True)

    for line in sys.stdin:
        if line.strip() == "REPORT":
            print(json.dumps({"clients": [c.report() for c in clients]}), flush=True)
        elif line.strip() == "STOP":
            break
    else:
        fail("stdin closed before STOP")

    print(json.dumps({"clients": [c.report() for c in clients]}), flush=True)
    for client in clients:
        client.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
