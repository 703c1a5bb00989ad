"""Posts a message through the admin API, as the web application's backend does.

    CHANNELMESH_ADMIN_TOKEN=... tests/.venv/bin/python tests/clients/python/post_message.py \\
        --channel CGENERAL --user UWEBAPP --text "hello from the web app"
"""

import argparse
import os

import channelmesh_admin


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin", default="127.0.0.1:50051")
    parser.add_argument("--channel", required=True)
    parser.add_argument("--user", default="UWEBAPP")
    parser.add_argument("--text", required=True)
    args = parser.parse_args()
    _, pb, stub = channelmesh_admin.connect(args.admin)
    auth = [("authorization", f"Bearer {os.environ['CHANNELMESH_ADMIN_TOKEN']}")]
    reply = stub.PostMessage(pb.PostMessageRequest(channel=args.channel, user=args.user, text=args.text), metadata=auth)
    print(f"posted, ts {reply.ts}")


if __name__ == "__main__":
    main()
