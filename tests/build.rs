//! Compiles the echo service the gRPC tests run through the mesh.

fn main() {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    if let Err(e) = tonic_prost_build::configure().compile_protos(&["proto/echo.proto"], &["proto"]) {
        panic!("\n\ncompiling proto/echo.proto failed: {e}\nprotoc comes with Debian's protobuf-compiler\n\n");
    }
}
