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
fn link() {
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
