// Makes the `nnserve` binary find libtorch (and TensorFlow) without environment variables.
//
// torch-sys links libtorch but its rpath does not reach dependent binaries, so we
// add the library directory it reports (`DEP_TCH_LIBTORCH_LIB`) as our own rpath.
// `libtorch_cuda.so` is not linked (nothing references it by symbol, and it would pull
// about 3 GB of NVIDIA libraries into every copy): `backend::torch::cuda_library` opens
// it through this rpath the first time a version asks about CUDA.
//
// With the `tensorflow` feature, the TF C API is opened at run time from a directory
// that holds `libtensorflow.so` and `libtensorflow_framework.so.2` (../shared/FACTS.md).
// The PyPI wheel names the first `libtensorflow_cc.so.2`, so this script makes that
// directory in OUT_DIR with two links into the wheel that `python3` (the venv's, first
// on PATH in the Makefile) finds, and passes its path to the code as
// NNSERVE_TENSORFLOW_DIR. `TENSORFLOW_DIR` at run time overrides it.
fn main() {
    protos();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    if std::env::var_os("CARGO_FEATURE_TENSORFLOW").is_some() {
        tensorflow_dir();
    }
}

fn tensorflow_dir() {
    println!("cargo:rerun-if-env-changed=NNSERVE_TENSORFLOW_WHEEL");
    let wheel = std::env::var("NNSERVE_TENSORFLOW_WHEEL").ok().or_else(|| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import importlib.util, os; s = importlib.util.find_spec('tensorflow'); \
                 print(os.path.dirname(s.origin) if s and s.origin else '')",
            ])
            .output()
            .ok()?;
        let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (!dir.is_empty()).then_some(dir)
    });
    let Some(wheel) = wheel.map(std::path::PathBuf::from) else {
        // Found later (a venv made after this build): look again when the environment that
        // finds python3 changes.
        println!("cargo:rerun-if-env-changed=PATH");
        println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
        println!(
            "cargo:warning=no tensorflow wheel found by python3: TensorFlow models will need TENSORFLOW_DIR at run time (make setup installs tensorflow-cpu)"
        );
        return;
    };
    let cc = wheel.join("libtensorflow_cc.so.2");
    let framework = wheel.join("libtensorflow_framework.so.2");
    println!("cargo:rerun-if-changed={}", cc.display());
    if !cc.is_file() || !framework.is_file() {
        println!(
            "cargo:warning=the tensorflow wheel at {} has no libtensorflow_cc.so.2 and libtensorflow_framework.so.2",
            wheel.display()
        );
        return;
    }
    let dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("tensorflow-lib");
    std::fs::create_dir_all(&dir).unwrap();
    for (link, target) in [
        ("libtensorflow.so", &cc),
        ("libtensorflow_framework.so.2", &framework),
    ] {
        let path = dir.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).unwrap();
    }
    println!("cargo:rustc-env=NNSERVE_TENSORFLOW_DIR={}", dir.display());
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
