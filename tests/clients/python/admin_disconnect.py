"""DisconnectUser and ListConnections from a real grpcio admin client, against live slack_sdk
RTM v2 clients in two regions.

Run by tests/mesh/admin_connections.rs against an in-process mesh; configuration arrives as
JSON in the environment variable CHANNELMESH_TEST. Prints "OK" on success; "FAIL: reason" and
exits 1 on the first failure. Every wait has a timeout.
"""

import json
import os
import queue
import time

import channelmesh_admin
import rtm_v2_exchange
from rtm_v2_exchange import TIMEOUT, fail


class Client(rtm_v2_exchange.Client):
    """The exchange test's recording rtm_v2 client, also recording the close frame it gets."""

    def __init__(self, name, base_url, token):
        super().__init__(name, base_url, token)
        self.closes = queue.Queue()
        self.was_closed = False
        # The library's own close listener: the close frame's code and reason.
        self.rtm.on_close_listeners.append(lambda code, reason: self.closes.put((code, reason)))

    def connect(self):
        super().connect()
        return self

    def closed(self):
        """The (code, reason) of the server's close frame, waited for."""
        try:
            got = self.closes.get(timeout=TIMEOUT)
            self.was_closed = True
            return got
        except queue.Empty:
            fail(f"{self.name} was not closed within {TIMEOUT}s")

    def close(self):
        """Closes the client; one the server closed already has no socket left to close (the
        library's own close would fail on it), only its threads to stop."""
        if not self.was_closed:
            super().close()
        else:
            self.rtm.closed = True

    def still_open(self):
        if not self.closes.empty():
            fail(f"{self.name} was closed: {self.closes.get()}")


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    grpc, pb, admin = channelmesh_admin.connect(config["admin_addr"], config["proto_root"])
    auth = [("authorization", f"Bearer {config['admin_token']}")]
    user, other = config["user"], config["other"]

    def post(channel, text):
        admin.PostMessage(pb.PostMessageRequest(channel=channel, user="UWEBAPP", text=text), metadata=auth)

    def refused(call, request, what):
        try:
            call(request, metadata=auth)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                fail(f"{what}: {e.code()} {e.details()}, not INVALID_ARGUMENT")
            return e.details()
        fail(f"{what} was accepted")

    # The user holds three connections: team T1 in each region, team T2 in us-east; another
    # user of T1 is in eu-west.
    a = Client("a (T1, us-east)", config["us_east"], config["t1_token"]).connect()
    b = Client("b (T1, eu-west)", config["eu_west"], config["t1_token"]).connect()
    c = Client("c (T2, us-east)", config["us_east"], config["t2_token"]).connect()
    o = Client("o (other, eu-west)", config["eu_west"], config["other_token"]).connect()
    print("four clients got hello", flush=True)

    # ListConnections: every connection, gateway and region, team, oldest first.
    want = sorted([("us-east", "T1"), ("eu-west", "T1"), ("us-east", "T2")])
    deadline = time.monotonic() + TIMEOUT
    while True:
        listed = admin.ListConnections(pb.ListConnectionsRequest(user=user), metadata=auth).connections
        seen = sorted((x.region, x.team) for x in listed)
        if seen == want:
            break
        if time.monotonic() > deadline:
            fail(f"ListConnections lists {seen}, not {want}")
        time.sleep(0.05)
    gateways = {x.region: x.gateway for x in listed}
    if gateways["us-east"] == gateways["eu-west"] or not all(gateways.values()):
        fail(f"gateways {gateways}")
    opened = [x.connected_at_ms for x in listed]
    now_ms = time.time() * 1000
    if opened != sorted(opened) or not all(now_ms - 60_000 < t <= now_ms + 1_000 for t in opened):
        fail(f"connected_at_ms {opened} (now {now_ms})")
    print(f"ListConnections: {[(x.gateway, x.region, x.team) for x in listed]}", flush=True)

    # Team T1 only, reconnect: 4010 with the reason; T2's connection and the other user stay.
    reason = "maintenance: please reconnect"
    asked = time.monotonic()
    reply = admin.DisconnectUser(
        pb.DisconnectUserRequest(user=user, team="T1", reason=reason, reconnect=True), metadata=auth
    )
    if reply.connections != 2:
        fail(f"DisconnectUser(team T1) counted {reply.connections} connections, not 2")
    for client in (a, b):
        got = client.closed()
        if got != (4010, reason):
            fail(f"{client.name} closed with {got}, not (4010, {reason!r})")
    took = time.monotonic() - asked
    print(f"team T1's connections in both regions closed with 4010 and the reason {took:.3f}s after the call", flush=True)
    # A connection made after the order (while the ring manager still holds it) is not
    # touched: proven once a later order has reached the same gateway and closed o.
    a.close()
    b.close()
    b2 = Client("b2 (T1, eu-west, reconnected)", config["eu_west"], config["t1_token"]).connect()
    admin.DisconnectUser(pb.DisconnectUserRequest(user=other, reason="bye", reconnect=False), metadata=auth)
    got = o.closed()
    if got != (4011, "bye"):
        fail(f"{o.name} closed with {got}, not (4011, 'bye')")
    post(user, "still here?")
    for client in (b2, c):
        client.expect(lambda e: e.get("type") == "message" and e.get("text") == "still here?", "a post after the disconnects")
        client.still_open()
    print("team T2's connection and a later connection stay open", flush=True)

    # Every team, no reconnect: 4011 with the reason cut to 100 bytes on a character boundary.
    long_reason = "account suspended: " + "é" * 100
    reply = admin.DisconnectUser(
        pb.DisconnectUserRequest(user=user, reason=long_reason, reconnect=False), metadata=auth
    )
    if reply.connections != 2:
        fail(f"DisconnectUser counted {reply.connections} connections, not 2")
    for client in (b2, c):
        code, said = client.closed()
        if code != 4011 or not long_reason.startswith(said) or not 90 < len(said.encode()) <= 100:
            fail(f"{client.name} closed with {(code, said)}")
    deadline = time.monotonic() + TIMEOUT
    while admin.ListConnections(pb.ListConnectionsRequest(user=user), metadata=auth).connections:
        if time.monotonic() > deadline:
            fail("ListConnections still lists connections after every one was closed")
        time.sleep(0.05)
    print("every connection closed with 4011 and the cut reason; none listed", flush=True)

    # Bad input is refused clearly.
    refused(admin.DisconnectUser, pb.DisconnectUserRequest(user=""), "DisconnectUser without a user")
    refused(admin.DisconnectUser, pb.DisconnectUserRequest(user=user, team="not a team"), "a bad team")
    refused(admin.ListConnections, pb.ListConnectionsRequest(user=""), "ListConnections without a user")

    for client in (b2, c, o):
        client.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
