// The same rpath fix as the server's (see host/build.rs).
include!("../host/build.rs");
