// The same rpath fix as the server's (host/build_link.rs); the bench has no gRPC code.
include!("../host/build_link.rs");

fn main() {
    link();
}
