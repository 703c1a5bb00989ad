//! channelmesh as one program: the `dev` mesh assembly and the test kit build on [`mesh`].

pub mod bench;
pub mod ctl;
pub mod fanout;
pub mod mesh;
pub mod multiprocess;
pub mod store_bench;

pub use mesh::{Mesh, MeshConfig};
