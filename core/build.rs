//! The messages of the gRPC protocols under `proto/` (KServe v2 as Triton serves it,
//! TensorFlow Serving's), compiled with protox (no `protoc` binary) and prost: the
//! request decoders in `src/grpc.rs` and their fuzz targets use them without tonic. The
//! server's build (host/build.rs) writes only the services, over these messages.

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    let files = [
        "inference.proto",
        "tensorflow_serving/apis/prediction_service.proto",
        "tensorflow_serving/apis/model_service.proto",
    ];
    let fds = protox::compile(files.map(|f| dir.join(f)), [&dir]).unwrap_or_else(|e| panic!("{e}"));
    prost_build::Config::new()
        // Bytes fields are `bytes::Bytes`, so a request's raw tensors are sliced, never
        // copied.
        .bytes(["."])
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("compiling proto/: {e}"));
}
