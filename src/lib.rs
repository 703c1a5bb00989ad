//! channelmesh as one program: the `dev` mesh assembly and the test kit build on [`mesh`].

pub mod ctl;
pub mod loadgen;
pub mod mesh;
pub mod multiprocess;

pub use mesh::{Mesh, MeshConfig};
