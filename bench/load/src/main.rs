//! A load generator that speaks HTTP/1.1 and gRPC (HTTP/2) with the same loop, so that
//! nnserve's protocols, and Triton's gRPC beside them, are measured by one client.
//! wrk speaks no gRPC and Python clients saturate before the server does; this runs on
//! one thread (as bench/load.py runs wrk), `--concurrency` requests in flight, each
//! worker on its own keep-alive connection (HTTP); gRPC workers share one channel, as gRPC
//! clients do (`--channels` gives them more).
//!
//! It sends one prepared message again and again: for HTTP the body of a POST, for gRPC
//! the serialized request message (bench/protocols.py makes both). It prints one JSON line:
//! requests, errors (and the first one), throughput and latency percentiles. Bounded in
//! time (`--seconds`) and count (`--max-requests`).

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "A one-thread load generator for HTTP/1.1 POSTs and unary gRPC calls")]
struct Args {
    /// `http://HOST:PORT/PATH` (HTTP/1.1 POST) or `grpc://HOST:PORT/package.Service/Method`
    target: String,
    /// The file whose bytes are sent: the POST body, or the serialized gRPC request message
    #[arg(long)]
    body: std::path::PathBuf,
    /// An HTTP header `name: value` (repeatable); gRPC sends its own
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests in flight at once
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// gRPC: HTTP/2 connections the workers share. Default 1: gRPC clients multiplex their
    /// calls on one channel (tritonclient, grpcio); `--channels N` with N = concurrency gives
    /// each worker its own, as HTTP/1 has
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Seconds of measured load, after one second of warm-up
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// At most this many measured requests in all
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Grpc(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

#[derive(Clone)]
struct Call {
    authority: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    grpc: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Every task (workers, connections) runs on this one thread.
    tokio::task::LocalSet::new().block_on(&rt, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (grpc, rest) = if let Some(r) = args.target.strip_prefix("grpc://") {
        (true, r)
    } else if let Some(r) = args.target.strip_prefix("http://") {
        (false, r)
    } else {
        anyhow::bail!("the target is http://HOST:PORT/PATH or grpc://HOST:PORT/Service/Method");
    };
    let (authority, path) = rest.split_once('/').context("the target has no path")?;
    let message =
        std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?;
    let body = if grpc {
        // gRPC's length-prefixed message: no compression flag, a u32 big-endian length.
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        Bytes::from(framed)
    } else {
        Bytes::from(message)
    };
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').context("a header is `name: value`")?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let call = Call {
        authority: authority.to_string(),
        path: format!("/{path}"),
        headers,
        body,
        grpc,
    };
    let c = args.concurrency.max(1);
    let channels = if grpc { args.channels.clamp(1, c) } else { c };
    // One connection per worker, except gRPC's channels, which workers share.
    let mut shared = Vec::with_capacity(channels);
    let mut senders = Vec::with_capacity(c);
    for i in 0..c {
        if grpc && i >= channels {
            match &shared[i % channels] {
                Sender::Grpc(s) => senders.push(Sender::Grpc(s.clone())),
                Sender::Http1(_) => unreachable!("gRPC channels are HTTP/2"),
            }
            continue;
        }
        let sender = connect(&call.authority, grpc).await?;
        if let (true, Sender::Grpc(s)) = (grpc, &sender) {
            shared.push(Sender::Grpc(s.clone()));
        }
        senders.push(sender);
    }
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + Duration::from_secs_f64(args.seconds);
    let budget = std::rc::Rc::new(std::cell::Cell::new(args.max_requests));
    let mut workers = Vec::new();
    for sender in senders {
        let (call, budget) = (call.clone(), budget.clone());
        workers.push(tokio::task::spawn_local(async move {
            let mut sender = sender;
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let (mut errors, mut first_error) = (0u64, None::<String>);
            loop {
                let t0 = Instant::now();
                if t0 >= end || budget.get() == 0 {
                    break;
                }
                let r = once(&mut sender, &call).await;
                let took = t0.elapsed();
                if t0 < warm_until {
                    continue;
                }
                budget.set(budget.get().saturating_sub(1));
                match r {
                    Ok(()) => lat.push(took.as_micros().min(u32::MAX as u128) as u32),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                        // A broken connection: open another.
                        if let Ok(s) = connect(&call.authority, call.grpc).await {
                            sender = s;
                        }
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut results = Vec::new();
    for w in workers {
        results.push(w.await);
    }
    let measured = (Instant::now().min(end) - warm_until)
        .as_secs_f64()
        .max(1e-9);
    let mut lat = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for r in results {
        let (l, e, f) = r?;
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": lat.len(), "errors": errors, "first_error": first_error,
            "seconds": measured, "rps": lat.len() as f64 / measured,
            "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99),
            "concurrency": c, "channels": channels,
        })
    );
    Ok(())
}

async fn connect(authority: &str, grpc: bool) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let io = hyper_util::rt::TokioIo::new(tcp);
    if grpc {
        let (sender, conn) = hyper::client::conn::http2::handshake(LocalExec, io).await?;
        tokio::task::spawn_local(conn);
        Ok(Sender::Grpc(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::task::spawn_local(conn);
        Ok(Sender::Http1(sender))
    }
}

/// Runs HTTP/2's connection tasks on this thread's LocalSet.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

async fn once(sender: &mut Sender, call: &Call) -> anyhow::Result<()> {
    let mut req = Request::post(if call.grpc {
        format!("http://{}{}", call.authority, call.path)
    } else {
        call.path.clone()
    });
    if call.grpc {
        req = req
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    } else {
        req = req.header("host", &call.authority);
    }
    for (k, v) in &call.headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(call.body.clone()))?;
    let resp = match sender {
        Sender::Http1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Sender::Grpc(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let status = resp.status();
    let header_status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let collected = resp.into_body().collect().await?;
    if !status.is_success() {
        anyhow::bail!("HTTP {status}");
    }
    if call.grpc {
        let code = header_status.or_else(|| {
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.to_str().unwrap_or("?").to_string())
        });
        if code.as_deref() != Some("0") {
            anyhow::bail!("grpc-status {}", code.unwrap_or_else(|| "missing".into()));
        }
    }
    Ok(())
}
