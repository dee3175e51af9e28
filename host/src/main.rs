use clap::Parser;
use nnserve::cli::{BundleCommand, Cli, Command};

// Small allocations on every request (headers, JSON, tensors): mimalloc serves them for
// less than glibc's malloc, which perf showed at about 11% of the server's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    nnserve::alloc::tune();
    nnserve::backend::prepare_process();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if nnserve::logging::capturing() {
                tracing::error!("nnserve: error: {e:#}");
                nnserve::logging::finish();
            } else {
                eprintln!("nnserve: error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// After a clean shutdown: shutdown has answered or cut every request already. A forward
/// that was cut may still run on its thread, and dropping the runtime would wait for it
/// (or libtorch's static destructors would run beside it): leave at once instead, with
/// everything written out.
fn exit_now() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    nnserve::logging::finish();
    // SAFETY: _exit ends the process without running atexit handlers.
    unsafe { libc::_exit(0) }
}

/// `--body`: the text itself, or `@FILE` (`@-`: stdin) for bytes.
fn read_body(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
            Ok(b)
        }
        Some(file) => std::fs::read(file).map_err(|e| anyhow::anyhow!("--body @{file}: {e}")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bundle(BundleCommand::Pack { dir, output }) => {
            println!("{}", nnserve::bundle_tool::pack(&dir, output.as_deref())?);
            Ok(())
        }
        Command::Bundle(BundleCommand::Push {
            file,
            server,
            token,
            token_file,
        }) => {
            let token = match token_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| {
                            anyhow::anyhow!("cannot read the token file {}: {e}", path.display())
                        })?
                        .trim_start_matches('\u{feff}')
                        .trim()
                        .to_string(),
                ),
                None => token,
            };
            println!(
                "{}",
                nnserve::bundle_tool::push(&file, &server, token.as_deref())?
            );
            Ok(())
        }
        Command::Bundle(BundleCommand::Run {
            path,
            body,
            json,
            content_type,
            log,
        }) => {
            nnserve::logging::init(&log, nnserve::logging::Format::Text)?;
            let (body, content_type) = match (body, json) {
                (_, Some(j)) => {
                    serde_json::from_str::<serde_json::Value>(&j)
                        .map_err(|e| anyhow::anyhow!("--json is not JSON: {e}"))?;
                    (
                        j.into_bytes(),
                        content_type.or(Some("application/json".to_string())),
                    )
                }
                (Some(b), None) => (read_body(&b)?, content_type),
                (None, None) => (Vec::new(), content_type),
            };
            let answer =
                nnserve::bundle_run::run(&path, nnserve::bundle_run::Call { body, content_type })?;
            nnserve::bundle_run::print(&answer, &mut std::io::stdout().lock())?;
            if !(200..300).contains(&answer.status) {
                anyhow::bail!("the bundle answered {}", answer.status);
            }
            Ok(())
        }
        Command::Plugin(nnserve::cli::PluginCommand::New {
            dir,
            world,
            model,
            sdk,
            sdk_git,
        }) => {
            use nnserve::scaffold::{default_sdk, new_plugin, Sdk};
            let sdk = match (sdk, sdk_git) {
                (_, Some(url)) => Sdk::Git(url),
                (Some(p), None) => Sdk::Path(p.canonicalize().map_err(|e| {
                    anyhow::anyhow!("--sdk {}: {e}", p.display())
                })?),
                (None, None) => Sdk::Path(default_sdk().ok_or_else(|| {
                    anyhow::anyhow!(
                        "no SDK beside this binary: give --sdk PATH (the nnserve repository's sdk/) \
                         or --sdk-git URL"
                    )
                })?),
            };
            print!("{}", new_plugin(&dir, world, &sdk, model.as_deref())?);
            Ok(())
        }
        Command::Dev { dir, listen, log } => {
            nnserve::logging::init(&log, nnserve::logging::Format::Text)?;
            nnserve::dev::run(&dir, listen)?;
            exit_now()
        }
        Command::Openapi => {
            println!("{}", nnserve::api::openapi::document_json());
            Ok(())
        }
        Command::Bundle(BundleCommand::Inspect { path }) => {
            print!("{}", nnserve::bundle_tool::inspect(&path)?);
            Ok(())
        }
        Command::Serve(args) => {
            nnserve::logging::init(&args.log, args.log_format)?;
            let config = args.to_config()?;
            // OpenMP's wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT) is read by libgomp when
            // it loads, before main: only the environment the server starts in sets it
            // (docs/configuration.md, Threads).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads())
                .enable_all()
                .build()?;
            runtime.block_on(nnserve::server::run(config))?;
            exit_now()
        }
    }
}
