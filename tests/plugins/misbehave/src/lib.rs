//! A test plugin that misbehaves on purpose, as its bundle config says:
//! - `mode = "trap"` traps (Wasm `unreachable`, no panic);
//! - `mode = "panic"` panics with a long two-line message (the SDK's hook reports it);
//! - `mode = "print"` writes two lines to stdout and one to stderr, then echoes;
//! - `mode = "shape"` gives its model (mlp, input [-1, 4]) a [1, 5] tensor;
//! - `mode = "config"` reads its whole config typed (`classes`, a list; `scale`, a
//!   table; `top_k`, a number) and answers it as JSON;
//! - `mode = "chain"` loads the model named by the `model` config value (a declared
//!   dependency, mlp-shaped: input [-1, 4]) and runs it on the JSON list of rows in the
//!   body, answering its output as a JSON list;
//! - `mode = "init"` answers how often its `init` ran in this instance's memory and how
//!   many requests this instance's memory has seen (`{"init_calls": n, "requests_seen":
//!   m}`); with `init_fails = true` its `init` fails (a load error);
//! - `mode = "loop"` spins forever (until the host's CPU budget stops it);
//! - `mode = "alloc"` grows memory past any cap;
//! - `mode = "tensors"` creates host tensors of 32 MiB and keeps them, past any
//!   host-memory budget;
//! - `mode = "framing"` answers with headers that would frame the HTTP message
//!   (`content-length: 5` on a longer body, `transfer-encoding`, `connection`, `upgrade`);
//! - `mode = "status"` answers with the status in the `status` config value (e.g. 101);
//! - `mode = "logflood"` writes 10,000 log lines with newlines inside, then echoes;
//! - `mode = "huge"` answers `size_mib` MiB (default 16), past the server's answer limit
//!   when that is set lower;
//! - any other mode answers 200 with the request body echoed, so a test can show the
//!   plugin itself works when it behaves.
use nnserve_sdk::bindings::wasi::nn::tensor::{Tensor as WasiTensor, TensorType};
use nnserve_sdk::{export_handler, host, Error, Handler, Request, Response};

struct Misbehave;

static INIT_CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static REQUESTS_SEEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Handler for Misbehave {
    fn init() -> Result<(), Error> {
        if host::config("init_fails").as_deref() == Some("true") {
            return Err(Error::internal("misbehave's init fails on purpose"));
        }
        host::log(host::LogLevel::Info, "misbehave init ran");
        INIT_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn handle(req: Request) -> Result<Response, Error> {
        match host::config("mode").as_deref() {
            Some("trap") => core::arch::wasm32::unreachable(),
            Some("panic") => panic!(
                "misbehave panicked on purpose: {}\nits second line",
                "y".repeat(300)
            ),
            Some("print") => {
                println!("misbehave says hello on stdout");
                println!("and a second line with a forged \x1b[31mescape");
                eprintln!("misbehave says hello on stderr");
                Ok(Response::bytes("application/octet-stream", req.body))
            }
            Some("config") => {
                #[derive(serde::Deserialize, serde::Serialize)]
                struct Config {
                    mode: String,
                    classes: Vec<String>,
                    scale: std::collections::BTreeMap<String, f64>,
                    top_k: u32,
                }
                let config: Config = nnserve_sdk::config()?;
                Response::json(&config)
            }
            Some("shape") => {
                let input = nnserve_sdk::Tensor::f32(&[1, 5], &[1.0; 5]);
                let out = nnserve_sdk::Model::load()?.infer_one("input", input)?;
                Ok(Response::json(&out.to_f32()?)?)
            }
            Some("chain") => {
                let rows: Vec<[f32; 4]> = req.json()?;
                let flat: Vec<f32> = rows.iter().flatten().copied().collect();
                let input = nnserve_sdk::Tensor::f32(&[rows.len() as u32, 4], &flat);
                let name = host::config("model").unwrap_or_default();
                let out = nnserve_sdk::Model::load_named(&name)?.infer_one("input", input)?;
                Ok(Response::json(&out.to_f32()?)?)
            }
            Some("init") => {
                use std::sync::atomic::Ordering::SeqCst;
                let seen = REQUESTS_SEEN.fetch_add(1, SeqCst) + 1;
                Response::json(&serde_json::json!({
                    "init_calls": INIT_CALLS.load(SeqCst),
                    "requests_seen": seen,
                }))
            }
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
            Some("huge") => {
                let mib = host::config_or("size_mib", 16usize)?;
                Ok(Response::bytes(
                    "application/octet-stream",
                    vec![b'x'; mib << 20],
                ))
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
