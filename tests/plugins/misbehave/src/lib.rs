//! A test plugin that misbehaves on purpose, as its bundle config says:
//! `mode = "trap"` panics (a Wasm trap), `mode = "loop"` spins forever (until the
//! host's CPU budget stops it), `mode = "alloc"` grows memory past any cap; any other
//! mode answers 200 with the request body echoed, so a test can show the plugin
//! itself works when it behaves.
use nnserve_sdk::{export_handler, host, Error, Handler, Request, Response};

struct Misbehave;

impl Handler for Misbehave {
    fn handle(req: Request) -> Result<Response, Error> {
        match host::config("mode").as_deref() {
            Some("trap") => panic!("misbehave: trapping on purpose"),
            Some("loop") => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Some("alloc") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => Ok(Response::bytes("application/octet-stream", req.body)),
        }
    }
}

export_handler!(Misbehave);
