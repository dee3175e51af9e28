//! nnserve's benchmark harness: measures and prints, asserts nothing.
//!
//! ```text
//! nnserve-bench inproc REPOSITORY          costs inside the process: the forward, the
//!                                          execution path around it, the plugin call
//! nnserve-bench http URL PATH BODYFILE N   a keep-alive loop of N POSTs on one connection
//! nnserve-bench raw BUNDLE_DIR             the raw forward limit at batch 1, 8, 32, 64
//! nnserve-bench plugin BUNDLE_DIR BODYFILE [N]
//!                                          one bundle's plugin call (decode, preprocess,
//!                                          forward, answer) beside its forward alone
//! ```
//! Environment: `NNSERVE_BENCH_THREADS` (libtorch intra-op threads, default 1, the
//! server's default), `NNSERVE_BENCH_PARALLEL` (raw: that many OS threads run forwards at
//! once, default 1), `NNSERVE_BENCH_SECONDS` (raw: time per batch size, default 1),
//! `NNSERVE_BENCH_BATCHES` (raw: the batch sizes, default `1,8,32,64`),
//! `NNSERVE_BENCH_INPUT` (raw and plugin: a file of input rows for the raw forward
//! instead of zeros).
//! `bench/run.sh` builds what it needs and runs both on the example repository.

// The server's allocator (host/src/main.rs): tensors handed between threads behave alike.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use nnserve::lifecycle::loader::load_version;
use nnserve::lifecycle::{ModelVersion, Servable};
use nnserve::plugin::{PluginRuntime, RuntimeConfig};
use nnserve::repository::Entry;
use nnserve::tensor::Tensor;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    // The server's allocator settings, so that the limit is measured as the server runs.
    nnserve::alloc::tune();
    nnserve::backend::prepare_process();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("inproc") => inproc(
            Path::new(
                args.get(2)
                    .map(String::as_str)
                    .unwrap_or("examples/repository"),
            ),
            args.get(3).map(String::as_str) == Some("plugin"),
        ),
        Some("raw") if args.len() == 3 => raw(Path::new(&args[2])),
        Some("plugin") if args.len() == 4 || args.len() == 5 => plugin_bundle(
            Path::new(&args[2]),
            &std::fs::read(&args[3])?,
            args.get(4).map(|n| n.parse()).transpose()?.unwrap_or(500),
        ),
        Some("http") if args.len() == 6 || args.len() == 7 => http(
            &args[2],
            &args[3],
            &std::fs::read(&args[4])?,
            args[5].parse()?,
            args.get(6)
                .map_or("application/octet-stream", String::as_str),
        ),
        _ => {
            eprintln!("usage: nnserve-bench inproc REPOSITORY | raw BUNDLE_DIR | plugin BUNDLE_DIR BODYFILE [N] | http URL PATH BODYFILE N [CONTENT_TYPE]");
            std::process::exit(2)
        }
    }
}

/// Percentiles of a sample, in microseconds.
fn summary(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let us = |q: f64| d[((d.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "{name:<58} p50 {:>9.1} us   p90 {:>9.1} us   p99 {:>9.1} us   (n={})",
        us(0.5),
        us(0.9),
        us(0.99),
        d.len()
    );
}

fn time<F: FnMut()>(n: usize, mut f: F) -> Vec<Duration> {
    for _ in 0..n / 10 {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn load(repo: &Path, model: &str, rt: &PluginRuntime) -> anyhow::Result<Arc<ModelVersion>> {
    let entry = Entry {
        model: model.into(),
        version: 1,
        dir: repo.join(model).join("1"),
    };
    model_of(load_version(&entry, rt, Default::default, None)?)
}

/// The model version of a loaded servable (the benchmarks load models, not endpoints).
fn model_of(s: Servable) -> anyhow::Result<Arc<ModelVersion>> {
    match s {
        Servable::Model(m) => Ok(m),
        Servable::Endpoint(_) => anyhow::bail!("an endpoint bundle: benchmark a model"),
    }
}

fn inproc(repo: &Path, plugin_only: bool) -> anyhow::Result<()> {
    // libtorch intra-op threads for this run (NNSERVE_BENCH_THREADS, default 1).
    let threads: usize = env_or("NNSERVE_BENCH_THREADS", 1);
    nnserve::backend::init_threads(Some(threads), 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rt = PluginRuntime::new(RuntimeConfig::default())?;
    let mlp = load(repo, "mlp", &rt)?;
    let digits = load(repo, "digits", &rt)?;
    let row = Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let n = 20_000;

    println!("== in-process costs (libtorch intra-op threads: {threads})");
    if !plugin_only {
        mlp_costs(&runtime, &mlp, repo, &row, n)?;
    }
    plugin_costs(&runtime, &digits)
}

fn mlp_costs(
    runtime: &tokio::runtime::Runtime,
    mlp: &ModelVersion,
    repo: &Path,
    row: &Tensor,
    n: usize,
) -> anyhow::Result<()> {
    let runner = mlp.runner().clone();
    summary(
        "mlp: Runner::forward, batch 1 (inline on the caller)",
        runtime.block_on(async {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                runner.forward(vec![row.clone()]).await.unwrap();
                v.push(t.elapsed());
            }
            v
        }),
    );
    let bundle = nnserve::bundle::Bundle::open(&repo.join("mlp").join("1"))?;
    let (model, _) = load_raw(&bundle)?;
    summary(
        "mlp: raw libtorch forward, batch 1 (the limit)",
        time(n, || {
            model.forward(vec![row.clone()]).unwrap();
        }),
    );
    // For comparison, two hand-offs the execution path does not use for tiny models.
    let m2 = model.clone();
    let x2 = row.clone();
    summary(
        "mlp: same forward via spawn_blocking per call (not used)",
        runtime.block_on(async move {
            let mut v = Vec::with_capacity(n / 4);
            for _ in 0..n / 4 {
                let (m, x) = (m2.clone(), x2.clone());
                let t = Instant::now();
                tokio::task::spawn_blocking(move || m.forward(vec![x]).unwrap())
                    .await
                    .unwrap();
                v.push(t.elapsed());
            }
            v
        }),
    );
    let m3 = model.clone();
    let x3 = row.clone();
    summary(
        "mlp: same forward inside block_in_place (for slow models)",
        runtime.block_on(async move {
            tokio::spawn(async move {
                let mut v = Vec::with_capacity(n / 4);
                for _ in 0..n / 4 {
                    let t = Instant::now();
                    tokio::task::block_in_place(|| m3.forward(vec![x3.clone()]).unwrap());
                    v.push(t.elapsed());
                }
                v
            })
            .await
            .unwrap()
        }),
    );

    Ok(())
}

fn plugin_costs(runtime: &tokio::runtime::Runtime, digits: &ModelVersion) -> anyhow::Result<()> {
    let png = std::fs::read(PathBuf::from("/tmp/nnserve-bench-digit.png")).ok();
    if let (Some(plugin), Some(png)) = (digits.handler.as_ref(), png) {
        let req = || nnserve::plugin::HttpRequest {
            method: "POST".into(),
            path: "/v1/models/digits:infer".into(),
            headers: vec![],
            content_type: Some("image/png".into()),
            body: png.clone(),
        };
        summary(
            "digits: plugin call (instantiate + decode + forward + top-k)",
            runtime.block_on(async {
                let mut v = Vec::with_capacity(2000);
                for _ in 0..2000 {
                    let t = Instant::now();
                    plugin.handle(req(), Duration::from_secs(5)).await.unwrap();
                    v.push(t.elapsed());
                }
                v
            }),
        );
        let input = Tensor::from_f32(vec![1, 1, 8, 8], &[0.0; 64]);
        let dr = digits.runner().clone();
        summary(
            "digits: Runner::forward alone, batch 1",
            runtime.block_on(async {
                let mut v = Vec::with_capacity(5000);
                for _ in 0..5000 {
                    let t = Instant::now();
                    dr.forward(vec![input.clone()]).await.unwrap();
                    v.push(t.elapsed());
                }
                v
            }),
        );
        let bad = nnserve::plugin::HttpRequest {
            body: b"not an image".to_vec(),
            ..req()
        };
        summary(
            "digits: plugin call that returns early (instantiate + handle)",
            runtime.block_on(async {
                let mut v = Vec::with_capacity(5000);
                for _ in 0..5000 {
                    let t = Instant::now();
                    let _ = plugin.handle(bad.clone(), Duration::from_secs(5)).await;
                    v.push(t.elapsed());
                }
                v
            }),
        );
    } else {
        println!("(write a PNG to /tmp/nnserve-bench-digit.png to time the digits plugin)");
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(default)
}

/// The raw limit: libtorch forward throughput in-process at batch sizes 1, 8, 32 and 64,
/// on zeros (or `NNSERVE_BENCH_INPUT`'s rows) of the bundle's first input shape, with
/// `NNSERVE_BENCH_THREADS` intra-op
/// threads (default 1) and `NNSERVE_BENCH_PARALLEL` OS threads forwarding at once
/// (default 1). Prints `RAW batch rows/s p50_us` lines for scripts.
fn raw(bundle_dir: &Path) -> anyhow::Result<()> {
    let threads: usize = env_or("NNSERVE_BENCH_THREADS", 1);
    let parallel: usize = env_or("NNSERVE_BENCH_PARALLEL", 1usize).max(1);
    let seconds: f64 = env_or("NNSERVE_BENCH_SECONDS", 1.0);
    nnserve::backend::init_threads(Some(threads), 1);
    let bundle = nnserve::bundle::Bundle::open(bundle_dir)?;
    let (model, inputs) = load_raw(&bundle)?;
    let input = &inputs[0];
    // NNSERVE_BENCH_BATCHES: the batch sizes to run, comma-separated (default 1,8,32,64).
    let batches: Vec<i64> = std::env::var("NNSERVE_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8,32,64".into())
        .split(',')
        .map(|b| b.trim().parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("NNSERVE_BENCH_BATCHES: {e}"))?;
    for batch in batches {
        let x = input_rows(input, batch)?;
        // Each forwarding thread warms up itself, then all forward until the time is up
        // (and at least twice); rows/s is the total over the wall time of the whole run.
        // Forwards of more than one thread run on the backend's forward threads, as the
        // server's do (until session 4 this loop warmed up on the main thread and measured
        // on another: two libgomp teams, which throttle each other; docs/configuration.md,
        // "The forward threads").
        let ready = std::sync::Barrier::new(parallel + 1);
        let run = || {
            // Warm-up: at least 2 forwards (the TorchScript executor specialises on the
            // first shapes), then up to 20 or one second.
            let warm = Instant::now();
            for i in 0..20 {
                if i >= 2 && warm.elapsed() > Duration::from_secs(1) {
                    break;
                }
                model.forward(vec![x.clone()]).unwrap();
            }
            ready.wait();
            let started = Instant::now();
            let mut times = Vec::new();
            while times.len() < 2 || started.elapsed().as_secs_f64() < seconds {
                let t = Instant::now();
                model.forward(vec![x.clone()]).unwrap();
                times.push(t.elapsed());
            }
            times
        };
        let (started, per_thread): (Instant, Vec<Vec<Duration>>) = std::thread::scope(|s| {
            let handles: Vec<_> = (0..parallel).map(|_| s.spawn(run)).collect();
            ready.wait(); // all warm
            let started = Instant::now();
            (
                started,
                handles.into_iter().map(|h| h.join().unwrap()).collect(),
            )
        });
        let wall = started.elapsed();
        let mut times: Vec<Duration> = per_thread.into_iter().flatten().collect();
        times.sort();
        let rows_per_s = batch as f64 * times.len() as f64 / wall.as_secs_f64();
        println!(
            "RAW {batch} {rows_per_s:.1} {:.1}",
            times[times.len() / 2].as_secs_f64() * 1e6
        );
    }
    Ok(())
}

/// A bundle's model loaded alone, its forwards on NNSERVE_BENCH_THREADS intra-op threads
/// (default 1; more run on the backend's forward threads, as the server's do).
/// The bundle's model, and its inputs (the manifest's, or a TF signature's).
fn load_raw(
    bundle: &nnserve::bundle::Bundle,
) -> anyhow::Result<(
    std::sync::Arc<dyn nnserve::backend::Model>,
    Vec<nnserve::bundle::TensorSpec>,
)> {
    let loaded = nnserve::backend::load(bundle)?;
    let model = loaded.model;
    model.set_threads(nnserve::backend::IntraOp::Fixed(env_or(
        "NNSERVE_BENCH_THREADS",
        1,
    )));
    let inputs = match loaded.signature {
        Some((inputs, _)) => inputs,
        None => {
            bundle
                .manifest
                .model
                .clone()
                .expect("a model bundle")
                .inputs
        }
    };
    Ok((model, inputs))
}

/// A batch of `batch` rows of `input`: zeros, or the rows of the file named by
/// `NNSERVE_BENCH_INPUT` (raw little-endian bytes of whole rows) repeated. On this CPU a
/// ResNet forward on zeros runs about 3 % (a real image) to 10 % (randn) faster than on
/// data, so the limit is measured on the tensor the server is fed (bench/make_resnet.py
/// writes it next to the image).
fn input_rows(input: &nnserve::bundle::TensorSpec, batch: i64) -> anyhow::Result<Tensor> {
    let mut shape = input.shape.clone();
    shape[0] = batch;
    let bytes = nnserve::tensor::numel(&shape) * input.dtype.size();
    let row_bytes = nnserve::tensor::numel(&input.shape[1..]) * input.dtype.size();
    let data = match std::env::var_os("NNSERVE_BENCH_INPUT") {
        Some(path) => {
            let rows = std::fs::read(&path)
                .map_err(|e| anyhow::anyhow!("NNSERVE_BENCH_INPUT {path:?}: {e}"))?;
            anyhow::ensure!(
                !rows.is_empty() && rows.len() % row_bytes == 0,
                "NNSERVE_BENCH_INPUT {path:?}: {} bytes, not whole rows of {row_bytes}",
                rows.len()
            );
            rows.into_iter().cycle().take(bytes).collect()
        }
        None => vec![0; bytes],
    };
    Tensor::new(input.dtype, shape, data).map_err(anyhow::Error::msg)
}

/// One bundle's plugin call in-process (fresh instance, decode, preprocess, the forward
/// through the version's execution path, the answer), beside the raw forward at batch 1
/// (interleaved with the calls) and the plugin call that fails at once on a bad body. Prints `PLUGIN`, `FORWARD` and
/// `EARLY` lines with p50 and p99 in microseconds for scripts.
fn plugin_bundle(bundle_dir: &Path, body: &[u8], n: usize) -> anyhow::Result<()> {
    let threads: usize = env_or("NNSERVE_BENCH_THREADS", 1);
    nnserve::backend::init_threads(Some(threads), 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rt = PluginRuntime::new(RuntimeConfig::default())?;
    let bundle = nnserve::bundle::Bundle::open(bundle_dir)?;
    let entry = Entry {
        model: bundle.name().to_string(),
        version: bundle.version(),
        dir: bundle_dir.to_path_buf(),
    };
    let servable = model_of(load_version(&entry, &rt, Default::default, None)?)?;
    let name = servable.name().to_string();
    let plugin = servable
        .handler
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{} has no handler plugin", bundle_dir.display()))?;
    let req = |body: &[u8]| nnserve::plugin::HttpRequest {
        method: "POST".into(),
        path: format!("/v1/models/{name}:infer"),
        headers: vec![],
        content_type: None,
        body: body.to_vec(),
    };
    let answer = runtime.block_on(plugin.handle(req(body), Duration::from_secs(30)));
    match &answer {
        Ok(r) => println!("answer: {}", String::from_utf8_lossy(&r.body)),
        Err(e) => anyhow::bail!("the plugin failed: {e:?}"),
    }
    let p = |tag: &str, label: &str, mut d: Vec<Duration>| {
        d.sort();
        let us = |q: f64| d[((d.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        println!("{tag} {:.1} {:.1}", us(0.5), us(0.99));
        summary(label, d);
    };
    let spec = servable
        .bundle
        .manifest
        .model
        .clone()
        .expect("a model bundle");
    let x = input_rows(&spec.inputs[0], 1)?;
    // The same model loaded once more: its raw forward (the version's execution path adds
    // microseconds to it, see `inproc`).
    let (model, _) = load_raw(&servable.bundle)?;
    println!("== {name}: in-process, libtorch intra-op threads {threads}, n={n}");
    // Interleaved, so that both see the same machine (a slow forward has noisy neighbours).
    let (calls, forwards) = runtime.block_on(async {
        for _ in 0..n / 10 {
            plugin
                .handle(req(body), Duration::from_secs(30))
                .await
                .unwrap();
            model.forward(vec![x.clone()]).unwrap();
        }
        let (mut calls, mut forwards) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let r = req(body);
            let t = Instant::now();
            plugin.handle(r, Duration::from_secs(30)).await.unwrap();
            calls.push(t.elapsed());
            let x = x.clone();
            let t = Instant::now();
            model.forward(vec![x]).unwrap();
            forwards.push(t.elapsed());
        }
        (calls, forwards)
    });
    // Warm now: the answer once more (a bundle with `timing = "true"` shows its stages).
    if let Ok(r) = runtime.block_on(plugin.handle(req(body), Duration::from_secs(30))) {
        println!("answer (warm): {}", String::from_utf8_lossy(&r.body));
    }
    p(
        "PLUGIN",
        &format!("{name}: plugin call (instantiate + decode + preprocess + forward + top-k)"),
        calls,
    );
    p(
        "FORWARD",
        &format!("{name}: raw forward alone, batch 1"),
        forwards,
    );
    p(
        "EARLY",
        &format!("{name}: plugin call that fails at once (instantiate + handle)"),
        runtime.block_on(async {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let r = req(b"not an image");
                let t = Instant::now();
                let _ = plugin.handle(r, Duration::from_secs(30)).await;
                v.push(t.elapsed());
            }
            v
        }),
    );
    Ok(())
}

/// A bare keep-alive HTTP/1.1 loop on one connection: the client costs next to nothing.
fn http(url: &str, path: &str, body: &[u8], n: usize, content_type: &str) -> anyhow::Result<()> {
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let mut one = || -> anyhow::Result<()> {
        stream.write_all(&request)?;
        let mut status = String::new();
        reader.read_line(&mut status)?;
        anyhow::ensure!(status.contains(" 200 "), "status line: {status}");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut buf = vec![0u8; len];
        reader.read_exact(&mut buf)?;
        Ok(())
    };
    for _ in 0..n / 10 {
        one()?;
    }
    let mut d = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        one()?;
        d.push(t.elapsed());
    }
    let total = started.elapsed();
    summary(&format!("http POST {path}"), d);
    println!(
        "{:<58} {:.0} req/s on one connection",
        "",
        n as f64 / total.as_secs_f64()
    );
    Ok(())
}
