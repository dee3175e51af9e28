// The server's build: finding libtorch and TensorFlow at run time (build_link.rs, which
// nnserve-bench's build shares), and the gRPC services.
include!("build_link.rs");

fn main() {
    protos();
    link();
}

/// Compiles the gRPC protocols under `proto/` (KServe v2 as Triton serves it, TensorFlow
/// Serving's services; proto/README.md) with protox, so that no `protoc` binary is
/// needed, into the server traits over nnserve-core's messages (its build.rs compiles
/// the same files; bytes fields are `bytes::Bytes` there, so a request's raw tensors are
/// sliced, never copied). The encoded descriptor set goes
/// beside them for server reflection and the tests.
fn protos() {
    use prost::Message;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    let files = [
        "inference.proto",
        "tensorflow_serving/apis/prediction_service.proto",
        "tensorflow_serving/apis/model_service.proto",
    ];
    let fds = protox::compile(files.map(|f| dir.join(f)), [&dir]).unwrap_or_else(|e| panic!("{e}"));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("descriptors.bin"), fds.encode_to_vec()).unwrap();
    // The messages are nnserve-core's (core/build.rs, the same protos and options), so
    // that its decoders and their fuzz targets build without tonic: here only the
    // services are written, over them.
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".inference", "::nnserve_core::grpc::inference")
        .extern_path(".tensorflow", "::nnserve_core::grpc::tensorflow")
        .bytes(".")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("compiling proto/: {e}"));
}
