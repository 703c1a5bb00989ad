//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "channelmesh/admin/v1/admin.proto",
        "channelmesh/channel/v1/channel.proto",
        "channelmesh/presence/v1/presence.proto",
        "channelmesh/ring/v1/ring.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("channelmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Reflection serves the public admin API alone: its own descriptor set.
    let admin = protox::compile([files[0]], [&root])?;
    std::fs::write(
        out.join("admin_descriptor.bin"),
        prost::Message::encode_to_vec(&admin),
    )?;
    tonic_prost_build::configure()
        .bytes(".channelmesh.channel.v1.RawEvent.json")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
