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
            let result = runtime.block_on(nnserve::server::run(config));
            if result.is_ok() {
                // Shutdown has answered or cut every request already. A forward that was
                // cut may still run on its thread, and dropping the runtime would wait
                // for it (or libtorch's static destructors would run beside it): leave
                // at once instead, with everything written out.
                use std::io::Write;
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().flush();
                nnserve::logging::finish();
                // SAFETY: _exit ends the process without running atexit handlers.
                unsafe { libc::_exit(0) };
            }
            result
        }
    }
}
