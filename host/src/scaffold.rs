//! `nnserve plugin new`: a plugin crate that is also its bundle, and the staging that
//! turns such a crate into a plain bundle for `bundle run` and `bundle pack`.
//!
//! A scaffolded crate holds `Cargo.toml`, `src/lib.rs`, `.cargo/config.toml` (the
//! target and the flags plugins are built with), `bundle.toml` whose plugin path is
//! cargo's output (`target/wasm32-wasip2/release/<name>.wasm`, `-` becoming `_`), a
//! warm-up request and a README of the loop. Nothing is copied by hand: the tools stage
//! the bundle the crate stands for (its `bundle.toml` with the plugin at
//! `plugins/handler.wasm`, and `model/`, `assets/`, `warmup/` as they are) into a
//! temporary directory, so that an archive never carries `src/` or `target/`.

use std::path::{Path, PathBuf};

/// The SDK a new crate depends on.
pub enum Sdk {
    Path(PathBuf),
    Git(String),
}

/// Which world the plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum World {
    Handler,
    Router,
}

/// The SDK that ships beside this binary (`<prefix>/share/nnserve/sdk`) or in the
/// checkout it was built in (`<checkout>/target/release/nnserve`).
pub fn default_sdk() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let bin = exe.parent()?;
    [
        bin.join("../share/nnserve/sdk"),
        bin.join("../../sdk"),
        bin.join("../sdk"),
    ]
    .into_iter()
    .find(|p| p.join("Cargo.toml").is_file() && p.join("wit/plugin.wit").is_file())
    .and_then(|p| p.canonicalize().ok())
}

/// The `.wasm` cargo builds for a crate named `name`.
pub fn wasm_name(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

/// Creates the crate `dir` (which must not exist). Returns what was made, for the
/// output.
pub fn new_plugin(
    dir: &Path,
    world: World,
    sdk: &Sdk,
    model: Option<&Path>,
) -> anyhow::Result<String> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{} has no usable name", dir.display()))?
        .to_string();
    crate::names::check_name("the plugin's name", &name).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{name}: a crate's name is letters, digits, `-` and `_`, starting with a letter"
    );
    anyhow::ensure!(
        !dir.exists(),
        "{} exists already: give a new directory",
        dir.display()
    );
    anyhow::ensure!(
        !(world == World::Router && model.is_some()),
        "a router has no model of its own (--model goes with --world handler)"
    );
    let (crate_dep, sdk_said) = match (sdk, world) {
        (Sdk::Path(p), World::Handler) => (
            format!("nnserve-sdk = {{ path = {:?} }}", p.display().to_string()),
            format!("the SDK at {}", p.display()),
        ),
        (Sdk::Path(p), World::Router) => (
            format!(
                "nnserve-router-sdk = {{ path = {:?} }}",
                p.join("router").display().to_string()
            ),
            format!("the router SDK at {}", p.join("router").display()),
        ),
        (Sdk::Git(url), World::Handler) => (
            format!("nnserve-sdk = {{ git = {url:?} }}"),
            format!("the SDK from {url}"),
        ),
        (Sdk::Git(url), World::Router) => (
            format!("nnserve-router-sdk = {{ git = {url:?} }}"),
            format!("the router SDK from {url}"),
        ),
    };
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join(".cargo"))?;
    let wasm = wasm_name(&name);
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
             [lib]\n# A WebAssembly component: target/wasm32-wasip2/release/{wasm}\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\n{crate_dep}\n{serde}\n\
             # The SDK pins wit-bindgen, whose bindings are the plugin's ABI with the server.\n\n\
             [profile.release]\nstrip = true\n",
            serde = if world == World::Handler {
                "serde = { version = \"1\", features = [\"derive\"] }\nserde_json = \"1\""
            } else {
                ""
            }
        ),
    )?;
    std::fs::write(
        dir.join(".cargo/config.toml"),
        "# `cargo build --release` builds the component; the flags are the ones nnserve's own\n\
         # plugins use (SIMD, and 4 MiB of memory at start: docs/plugins.md).\n\
         [build]\ntarget = \"wasm32-wasip2\"\n\n[target.wasm32-wasip2]\n\
         rustflags = [\"-Ctarget-feature=+simd128\", \"-Clink-arg=--initial-memory=4194304\"]\n",
    )?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    let model_section = match model {
        Some(file) => model_section(dir, file)?,
        None => String::new(),
    };
    let (src, section) = match world {
        World::Handler => (handler_src(model.is_some()), "handler"),
        World::Router => (ROUTER_SRC.to_string(), "router"),
    };
    std::fs::write(dir.join("src/lib.rs"), src)?;
    let config = if world == World::Handler {
        "config = { greeting = \"hello\" }\n"
    } else {
        ""
    };
    let endpoint = if world == World::Router {
        "\n# An endpoint: its variants are models the server has (docs/bundle.md, Endpoints).\n\
         [endpoint]\n\n[[variants]]\nmodel = \"mlp\"\nweight = 1\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("bundle.toml"),
        format!(
            "# The bundle this crate stands for. `nnserve bundle run .`, `nnserve bundle pack .`\n\
             # take the plugin from cargo's output below; nothing needs copying.\n\
             [bundle]\nname = \"{name}\"\nversion = 1\n{model_section}{endpoint}\n[{section}]\n\
             path = \"target/wasm32-wasip2/release/{wasm}\"\n{config}limits = {{ memory_mib = 64, cpu_ms = 100 }}\n"
        ),
    )?;
    if world == World::Handler {
        std::fs::create_dir_all(dir.join("warmup"))?;
        std::fs::write(
            dir.join("warmup/00.json"),
            format!(
                "{{\"route\": \"/v1/models/{name}:infer\", \"content_type\": \"application/json\", \"body\": {{\"name\": \"warm-up\"}}}}\n"
            ),
        )?;
    }
    std::fs::write(dir.join("README.md"), readme(&name, world))?;
    Ok(format!(
        "created {} ({section} plugin, depending on {sdk_said})\nnext:\n  cd {}\n  cargo build --release\n  nnserve bundle run . --json '{{\"name\": \"you\"}}'\n",
        dir.display(),
        dir.display()
    ))
}

/// `[model]` for a copied model file: a SavedModel says everything; a TorchScript file
/// only that it is one, so its tensors are placeholders to fill in.
fn model_section(dir: &Path, file: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir.join("model"))?;
    if file.is_dir() {
        anyhow::ensure!(
            file.join("saved_model.pb").is_file(),
            "{} is a directory without saved_model.pb: give a TorchScript file or a SavedModel directory",
            file.display()
        );
        copy_dir(file, &dir.join("model/saved_model"))?;
        return Ok(
            "\n# A SavedModel: its signature gives the inputs and outputs.\n[model]\n\
                   backend = \"tensorflow\"\npath = \"model/saved_model\"\n"
                .to_string(),
        );
    }
    std::fs::copy(file, dir.join("model/model.pt"))
        .map_err(|e| anyhow::anyhow!("cannot copy {}: {e}", file.display()))?;
    Ok(torchscript_section(file))
}

/// `[model]` for a TorchScript file: the input names `forward` takes (read from the
/// file), dtypes and shapes as placeholders, since TorchScript does not keep them.
fn torchscript_section(file: &Path) -> String {
    let head =
        "\n[model]\nbackend = \"torchscript\"\npath = \"model/model.pt\"\ndevice = \"auto\"\n";
    let todo = "# TODO: TorchScript keeps no dtypes or shapes: write each tensor's, in the order\n\
                # forward() takes and returns them. dtype: fp32, int64, ...; shape: -1 for a free\n\
                # dimension (the first is the batch).\n";
    let tensor = |name: &str| {
        format!("  {{ name = \"{name}\", dtype = \"fp32\", shape = [-1, 4] }},   # TODO\n")
    };
    match crate::scaffold_names::forward(file) {
        Ok(f) if !f.inputs.is_empty() => {
            let mut s = format!(
                "{head}# The input names are forward()'s parameters, read from the file.\n{todo}inputs = [\n"
            );
            for (name, ty) in &f.inputs {
                if ty != "Tensor" {
                    s += &format!(
                        "  # {name} is a {ty} in forward(): nnserve passes tensors only\n"
                    );
                }
                s += &tensor(name);
            }
            s += "]\n";
            match f.outputs {
                Some(n) => {
                    s += &format!(
                        "# forward() returns {n} tensor(s); name them as you like.\noutputs = [\n"
                    );
                    for i in 0..n {
                        s += &tensor(&if n == 1 {
                            "output".to_string()
                        } else {
                            format!("output_{i}")
                        });
                    }
                    s += "]\n";
                }
                None => {
                    s += "# forward() returns no tensor or tuple of tensors: nnserve needs one of those.\n\
                          outputs = [{ name = \"output\", dtype = \"fp32\", shape = [-1, 3] }]   # TODO\n";
                }
            }
            s
        }
        other => {
            let why = match other {
                Err(e) => format!("# (its inputs could not be read from the file: {e})\n"),
                Ok(_) => String::new(),
            };
            format!(
                "{head}{why}{todo}inputs = [{{ name = \"input\", dtype = \"fp32\", shape = [-1, 4] }}]     # TODO\n\
                 outputs = [{{ name = \"output\", dtype = \"fp32\", shape = [-1, 3] }}]   # TODO\n"
            )
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn handler_src(with_model: bool) -> String {
    let body = if with_model {
        r#"        // The bundle's model (fill in its tensors in bundle.toml first).
        let rows: Vec<Vec<f32>> = req.json()?;
        let width = rows.first().map_or(0, |r| r.len());
        if rows.iter().any(|r| r.len() != width) {
            return Err(Error::bad_request("every row needs as many values"));
        }
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let input = Tensor::f32(&[rows.len() as u32, width as u32], &flat);
        let output = Model::load()?.infer_one("input", input)?;
        Response::json(&output.to_f32()?)"#
    } else {
        r#"        // No model: pure pre- or post-processing. Model::load() gives the bundle's
        // model once bundle.toml has a [model].
        #[derive(serde::Deserialize)]
        struct Hello {
            name: String,
        }
        let hello: Hello = req.json()?; // a 400 naming the problem if the body is not that
        let config: Config = nnserve_sdk::config()?; // a 500 naming a wrong key
        host::log(host::LogLevel::Info, &format!("greeting {}", hello.name));
        Response::json(&serde_json::json!({ "message": format!("{}, {}!", config.greeting, hello.name) }))"#
    };
    let uses = if with_model {
        "use nnserve_sdk::{export_handler, Error, Handler, Model, Request, Response, Tensor};"
    } else {
        "use nnserve_sdk::{export_handler, host, Error, Handler, Request, Response};\n\n\
         /// `[handler] config` in bundle.toml.\n#[derive(serde::Deserialize)]\nstruct Config {\n    greeting: String,\n}"
    };
    format!(
        "//! A handler plugin: nnserve calls `handle` once per request to\n\
         //! POST /v1/models/<name>:infer (docs/plugins.md).\n\n{uses}\n\n\
         struct Plugin;\n\nimpl Handler for Plugin {{\n    fn handle(req: Request) -> Result<Response, Error> {{\n{body}\n    }}\n}}\n\n\
         export_handler!(Plugin);\n"
    )
}

const ROUTER_SRC: &str = r#"//! A router plugin: for each request to the endpoint, pick the variant that answers
//! (docs/plugins.md, Router plugins).

use nnserve_router_sdk::{export_router, Decision, RequestMeta, Router, Variant};

struct Plugin;

impl Router for Plugin {
    fn route(_meta: RequestMeta, variants: Vec<Variant>) -> Decision {
        // The variant with the fewest requests in flight.
        let best = variants
            .iter()
            .min_by_key(|v| v.stats.in_flight)
            .expect("the host passes at least one variant");
        Decision::to(&best.name)
    }
}

export_router!(Plugin);
"#;

fn readme(name: &str, world: World) -> String {
    let try_it = match world {
        World::Handler => format!(
            "nnserve bundle run . --json '{{\"name\": \"you\"}}'   # one request, no server\n\
             nnserve bundle pack . -o {name}-1.tar.gz\n\
             nnserve bundle push {name}-1.tar.gz --server http://127.0.0.1:8080\n\
             curl -s http://127.0.0.1:8080/v1/models/{name}:infer -d '{{\"name\": \"you\"}}'"
        ),
        World::Router => format!(
            "nnserve bundle pack . -o {name}-1.tar.gz\n\
             nnserve bundle push {name}-1.tar.gz --server http://127.0.0.1:8080\n\
             curl -s http://127.0.0.1:8080/v1/models/{name}:predict -d '{{\"instances\": [[1, 2, 3, 4]]}}'"
        ),
    };
    format!(
        "# {name}\n\nAn nnserve {} plugin. The loop:\n\n```sh\ncargo build --release            # target/wasm32-wasip2/release/{}\n{try_it}\n```\n\n\
         `bundle.toml` is the bundle: bump its `version` for the next upload. The guide is\n\
         docs/plugins.md in the nnserve repository.\n",
        if world == World::Handler { "handler" } else { "router" },
        wasm_name(name)
    )
}

/// A plugin crate's bundle, staged: when `dir` holds a `Cargo.toml`, a temporary bundle
/// with its `bundle.toml` (the plugin at `plugins/handler.wasm` or `plugins/router.wasm`),
/// the plugin cargo built, and `model/`, `assets/`, `warmup/`. `None` for a plain bundle.
pub fn stage(dir: &Path) -> anyhow::Result<Option<tempfile::TempDir>> {
    if !dir.join("Cargo.toml").is_file() || !dir.join("bundle.toml").is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(dir.join("bundle.toml"))?;
    let mut manifest: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("bundle.toml").display()))?;
    let staged = tempfile::Builder::new()
        .prefix("nnserve-bundle-")
        .tempdir()?;
    std::fs::create_dir(staged.path().join("plugins"))?;
    for section in ["handler", "router"] {
        let Some(toml::Value::Table(t)) = manifest.get_mut(section) else {
            continue;
        };
        let Some(toml::Value::String(path)) = t.get("path").cloned() else {
            continue;
        };
        let built = dir.join(crate::bundle::relative_path(&path).map_err(anyhow::Error::msg)?);
        anyhow::ensure!(
            built.is_file(),
            "{} is not built yet: run `cargo build --release` in {} first",
            path,
            dir.display()
        );
        let inside = format!("plugins/{section}.wasm");
        std::fs::copy(&built, staged.path().join(&inside))?;
        t.insert("path".into(), toml::Value::String(inside));
    }
    std::fs::write(staged.path().join("bundle.toml"), manifest.to_string())?;
    for sub in ["model", "assets", "warmup"] {
        if dir.join(sub).is_dir() {
            copy_dir(&dir.join(sub), &staged.path().join(sub))?;
        }
    }
    Ok(Some(staged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_crate_is_its_bundle_and_stages_without_its_sources() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("my-plugin");
        let said = new_plugin(
            &dir,
            World::Handler,
            &Sdk::Git("https://example.com/nnserve".into()),
            None,
        )
        .unwrap();
        assert!(said.contains("cargo build --release"), "{said}");
        let manifest = crate::bundle::parse_manifest(
            &std::fs::read_to_string(dir.join("bundle.toml")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            manifest.check(),
            Vec::<String>::new(),
            "a model-less handler bundle"
        );
        assert_eq!(
            manifest.handler.unwrap().path,
            "target/wasm32-wasip2/release/my_plugin.wasm"
        );
        assert!(
            new_plugin(&dir, World::Handler, &Sdk::Git("x".into()), None).is_err(),
            "exists"
        );
        let e = stage(&dir).unwrap_err().to_string();
        assert!(e.contains("cargo build --release"), "{e}");
        std::fs::create_dir_all(dir.join("target/wasm32-wasip2/release")).unwrap();
        std::fs::write(
            dir.join("target/wasm32-wasip2/release/my_plugin.wasm"),
            b"\0asm",
        )
        .unwrap();
        let staged = stage(&dir).unwrap().unwrap();
        let files: Vec<String> = crate::archive::list_files(staged.path())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            files,
            ["bundle.toml", "plugins/handler.wasm", "warmup/00.json"]
        );
        assert!(stage(t.path()).unwrap().is_none(), "not a crate");
    }
}
