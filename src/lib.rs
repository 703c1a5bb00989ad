//! channelmesh as one program: the `dev` mesh assembly and the test kit build on [`mesh`].

pub mod bench;
pub mod mesh;

pub use mesh::{Mesh, MeshConfig};
