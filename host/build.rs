// Makes the `nnserve` binary find libtorch without environment variables.
//
// torch-sys links libtorch but its rpath does not reach dependent binaries, so we
// add the library directory it reports (`DEP_TCH_LIBTORCH_LIB`) as our own rpath.
// The linker would also drop `libtorch_cuda.so` (nothing references it by symbol),
// which hides CUDA at run time; force it in when the wheel ships it.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
