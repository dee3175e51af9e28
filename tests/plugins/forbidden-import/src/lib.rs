//! A test plugin that imports `wasi:sockets` (through std's TCP support). nnserve must
//! refuse it at load and name the import; it is never run.
use nnserve_sdk::{export_handler, Error, Handler, Request, Response};

struct Forbidden;

impl Handler for Forbidden {
    fn handle(_req: Request) -> Result<Response, Error> {
        match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => Ok(Response::bytes("text/plain", b"connected".to_vec())),
            Err(e) => Err(Error::internal(e.to_string())),
        }
    }
}

export_handler!(Forbidden);
