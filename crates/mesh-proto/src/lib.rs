//! Generated protobuf and gRPC types; only the services' edge modules use them.

/// The public admin API the web application calls.
pub mod admin {
    tonic::include_proto!("channelmesh.admin.v1");
}

/// The internal channel-server API used by admin servers and gateways.
pub mod channel {
    tonic::include_proto!("channelmesh.channel.v1");
}

/// The internal presence-server API used by gateways and admin servers.
pub mod presence {
    tonic::include_proto!("channelmesh.presence.v1");
}

/// The internal ring-manager API.
pub mod ring {
    tonic::include_proto!("channelmesh.ring.v1");
}

/// The encoded `FileDescriptorSet` of every service: what checks that the authorization table
/// names every internal RPC. Served by nothing.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("channelmesh_descriptor");

/// The encoded `FileDescriptorSet` of the public admin API alone (`admin/v1/admin.proto`, which
/// imports nothing), for the admin server's gRPC reflection: the internal services stay unlisted.
pub const ADMIN_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("admin_descriptor");
