//! channelmesh as one program: the commands `src/main.rs` dispatches to that are not a single
//! service — `chaos` (fault injection with an invariant checker), `dev` (the whole mesh, in one process or as child processes; the test kit builds
//! on [`Mesh`]), `ctl`, `token`, `probe`; how every command stops ([`shutdown`]); and
//! `bench`, which runs the load generator ([`loadgen`]).

pub mod certs;
pub mod chaos;
pub mod ctl;
pub mod dev;
pub mod loadgen;
pub mod probe;
pub mod shutdown;
pub mod token;

/// The in-process mesh under its old path (`channelmesh::mesh::unix_now`, the tests).
pub use dev::mesh;
pub use dev::mesh::{Mesh, MeshConfig};
/// The multi-process mesh under its old path.
pub use dev::processes as multiprocess;

/// Says loudly, at start, that this process runs `--insecure`.
pub fn warn_insecure() {
    tracing::warn!(
        "--insecure: gRPC between the services is PLAINTEXT, with no authentication and no \
         authorization: anyone who can reach this process's ports can drive the mesh (drain \
         regions, register nodes, publish as any user, read any channel). For one machine only; \
         use mutual TLS (--tls-ca, --tls-cert, --tls-key) anywhere else."
    );
}
