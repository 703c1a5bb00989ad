"""A grpcio client for channelmesh's admin API, with stubs generated from the repo's proto."""

import os
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def connect(addr, proto_root=os.path.join(REPO, "proto")):
    """Returns (grpc, admin_pb2, AdminStub) for the admin server at `addr` ("host:port")."""
    import grpc
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="channelmesh-pb-")
    rc = protoc.main([
        "protoc",
        f"-I{proto_root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "channelmesh/admin/v1/admin.proto",
    ])
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with {rc}")
    sys.path.insert(0, out)
    from channelmesh.admin.v1 import admin_pb2, admin_pb2_grpc

    return grpc, admin_pb2, admin_pb2_grpc.AdminStub(grpc.insecure_channel(addr))
