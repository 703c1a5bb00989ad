"""Reads the admin API by gRPC server reflection (v1alpha, the protocol Python's
grpcio-reflection client speaks) and calls it with messages built from what reflection
returned: no generated code, as a generic tool (grpcurl, a GUI client) does.

    CHANNELMESH_ADMIN_TOKEN=... tests/.venv/bin/python tests/clients/python/reflect_admin.py \\
        --admin 127.0.0.1:50051 --channel CGENERAL

Prints one JSON line: the services listed, the Admin service's methods, and the ts of a message
posted through the dynamically built PostMessage, then its text read back through History.
"""

import argparse
import json
import os

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

ADMIN = "channelmesh.admin.v1.Admin"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin", default="127.0.0.1:50051")
    parser.add_argument("--channel", required=True)
    args = parser.parse_args()
    channel = grpc.insecure_channel(args.admin)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(database.get_services())
    pool = descriptor_pool.DescriptorPool(database)
    admin = pool.FindServiceByName(ADMIN)
    methods = sorted(m.name for m in admin.methods)
    auth = [("authorization", f"Bearer {os.environ['CHANNELMESH_ADMIN_TOKEN']}")]

    def call(name, **fields):
        method = admin.FindMethodByName(name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        stub = channel.unary_unary(
            f"/{ADMIN}/{name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        return stub(request_class(**fields), metadata=auth, timeout=10)

    posted = call("PostMessage", channel=args.channel, user="UREFLECT", text="posted by reflection")
    history = call("History", channel=args.channel, limit=10)
    texts = [json.loads(event.event_json).get("text") for event in history.events]
    # The internal services stay out of reach by this protocol too.
    try:
        database.FindFileContainingSymbol("channelmesh.ring.v1.RingManager")
        internal_hidden = False
    except (KeyError, grpc.RpcError) as refused:
        internal_hidden = not isinstance(refused, grpc.RpcError) or refused.code() == grpc.StatusCode.NOT_FOUND
    print(json.dumps({"services": services, "methods": methods, "ts": posted.ts, "history": texts,
                      "internal_hidden": internal_hidden}))


if __name__ == "__main__":
    main()
