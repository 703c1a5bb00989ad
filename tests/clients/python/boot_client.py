"""A real slack_sdk client of a gateway that boots from the web app (tests/mesh/boot.rs).

Configuration arrives as JSON in CHANNELMESH_TEST:
  {"base": "http://…/api/", "token": "…", "expect_error": "boot_unavailable"}
      rtm.connect through slack_sdk's WebClient must fail with that error (SlackApiError);
  {"base": …, "token": …, "name": "five-k", "channel": "CB04999", "text": "…"}
      an unmodified rtm_v2 RTMClient connects, checks its `self.name`, prints HELLO, then waits
      for a message with that text in that channel.
Prints OK on success; exits non-zero with FAIL: reason otherwise.
"""

import json
import os
import queue
import sys

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.rtm_v2 import RTMClient

TIMEOUT = 20.0


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def main():
    config = json.loads(os.environ["CHANNELMESH_TEST"])
    if "expect_error" in config:
        client = WebClient(token=config["token"], base_url=config["base"])
        try:
            answer = client.rtm_connect()
        except SlackApiError as e:
            if e.response.get("error") != config["expect_error"]:
                fail(f"rtm.connect failed with {e.response.data}, want {config['expect_error']}")
            print(f"rtm.connect refused: {e.response.get('error')}", flush=True)
            print("OK", flush=True)
            return
        fail(f"rtm.connect succeeded: {answer.data}")

    events = queue.Queue()
    rtm = RTMClient(token=config["token"], base_url=config["base"], auto_reconnect_enabled=False)

    @rtm.on("*")
    def record(_client, event):
        events.put(event)

    rtm.connect()
    while True:
        try:
            event = events.get(timeout=TIMEOUT)
        except queue.Empty:
            fail("no hello")
        if event.get("type") == "hello":
            break
    name = (rtm.web_client.rtm_connect().get("self") or {}).get("name")
    if name != config["name"]:
        fail(f"self.name is {name!r}, want {config['name']!r} from the web app")
    print("HELLO", flush=True)
    while True:
        try:
            event = events.get(timeout=TIMEOUT)
        except queue.Empty:
            fail(f"no message in {config['channel']}")
        if event.get("type") == "message" and event.get("channel") == config["channel"]:
            if event.get("text") != config["text"]:
                fail(f"got {event}")
            break
    rtm.auto_reconnect_enabled = False
    rtm.close()
    print("OK", flush=True)


if __name__ == "__main__":
    main()
