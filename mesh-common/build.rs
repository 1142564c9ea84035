//! Compiles the gRPC API when the `grpc` feature is on (never for the eBPF build, which has no use for it).

fn main() {
    println!("cargo:rerun-if-changed=proto/nodemesh.proto");
    #[cfg(feature = "grpc")]
    if let Err(e) = tonic_prost_build::configure()
        // Shared by every agent's stream: a clone is a reference, not a copy.
        .bytes(".nodemesh.v1.ConfigUpdate.packed_upserts")
        .compile_protos(&["proto/nodemesh.proto"], &["proto"])
    {
        panic!(
            "\n\ncompiling proto/nodemesh.proto failed: {e}\nprotoc comes with Debian's protobuf-compiler (`cargo xtask setup` installs it)\n\n"
        );
    }
}
