//! A test plugin that misbehaves on purpose, as its bundle config says:
//! - `mode = "trap"` panics (a Wasm trap);
//! - `mode = "loop"` spins forever (until the host's CPU budget stops it);
//! - `mode = "alloc"` grows memory past any cap;
//! - `mode = "tensors"` creates host tensors of 32 MiB and keeps them, past any
//!   host-memory budget;
//! - `mode = "framing"` answers with headers that would frame the HTTP message
//!   (`content-length: 5` on a longer body, `transfer-encoding`, `connection`, `upgrade`);
//! - `mode = "status"` answers with the status in the `status` config value (e.g. 101);
//! - `mode = "logflood"` writes 10,000 log lines with newlines inside, then echoes;
//! - any other mode answers 200 with the request body echoed, so a test can show the
//!   plugin itself works when it behaves.
use nnserve_sdk::bindings::wasi::nn::tensor::{Tensor as WasiTensor, TensorType};
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
            Some("tensors") => {
                let data = vec![1u8; 32 << 20];
                let mut kept = Vec::new();
                for _ in 0..64 {
                    kept.push(WasiTensor::new(&[8 << 20], TensorType::Fp32, &data));
                }
                Ok(Response::bytes(
                    "text/plain",
                    format!("kept {}", kept.len()).into_bytes(),
                ))
            }
            Some("framing") => Ok(Response::bytes("text/plain", vec![b'x'; 100])
                .with_header("content-length", "5")
                .with_header("Transfer-Encoding", "chunked")
                .with_header("connection", "close")
                .with_header("upgrade", "h2c")
                .with_header("proxy-authenticate", "Basic")
                .with_header("x-kept", "yes")),
            Some("status") => {
                let status = host::config_or("status", 101u16)?;
                Ok(Response::bytes("text/plain", b"odd".to_vec()).with_status(status))
            }
            Some("logflood") => {
                for i in 0..10_000 {
                    host::log(
                        host::LogLevel::Info,
                        &format!("line {i}\n2026-01-01T00:00:00Z ERROR forged by the plugin"),
                    );
                }
                Ok(Response::bytes("application/octet-stream", req.body))
            }
            _ => Ok(Response::bytes("application/octet-stream", req.body)),
        }
    }
}

export_handler!(Misbehave);
