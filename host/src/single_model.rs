//! One model where a repository was expected: what KServe's storage initializer leaves
//! in `/mnt/models` for an `InferenceService` (docs/kubernetes.md). The directory given
//! as `--repository` holds one of:
//! - a repository, `<model>/<version>/...`: served as it is (nothing here applies);
//! - one bundle, `bundle.toml` at its top: the model `--model-name` (default: the
//!   bundle's own name), the bundle's version;
//! - a TF Serving model base path, `<version>/saved_model.pb`: the model
//!   `--model-name`, each version found at start;
//! - a bare TorchScript file (`*.pt`, `*.pth`, `*.torchscript`, alone at the top): the
//!   model `--model-name`, version 1, with the inputs and outputs given by `--input`
//!   and `--output`.
//!
//! The model is served from a *view*: a repository in a fresh temporary directory whose
//! version directories are symlinks to the given one (read-only there, as KServe mounts
//! it), or for a bare file a version directory with a manifest made from the flags and
//! the file linked in (a hard link when the file system allows, else a copy, because a
//! bundle's files may not be symlinks out of it).

use crate::config::ServerConfig;
use std::path::{Path, PathBuf};

/// What the directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Layout {
    Repository,
    Bundle,
    TfServing(Vec<u64>),
    TorchScript(PathBuf),
}

/// Recognises the layout of `dir` (see the module's doc).
pub fn detect(dir: &Path) -> std::io::Result<Layout> {
    if dir.join("bundle.toml").is_file() {
        return Ok(Layout::Bundle);
    }
    let mut versions = Vec::new();
    let mut scripts = Vec::new();
    let mut others = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            match crate::names::parse_version(&name) {
                Ok(v) if path.join("saved_model.pb").is_file() => versions.push(v),
                _ => others += 1,
            }
        } else if [".pt", ".pth", ".torchscript"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            scripts.push(path);
        }
    }
    versions.sort_unstable();
    Ok(match (versions.is_empty(), scripts.len(), others) {
        (false, 0, 0) => Layout::TfServing(versions),
        (true, 1, 0) => Layout::TorchScript(scripts.remove(0)),
        _ => Layout::Repository,
    })
}

/// The directory to serve as the repository: `config.repository` itself when it is
/// one, else a view of the one model it holds (the `TempDir` must live as long as the
/// server). Refuses flags that would be ignored.
pub fn prepare(config: &ServerConfig) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let dir = &config.repository;
    // Checked before the listeners open, so a wrong path stops the server at once.
    let layout = detect(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the repository {}: {e} (create it, or pass --repository DIR)",
            dir.display()
        )
    })?;
    let flags_given = !config.model_inputs.is_empty() || !config.model_outputs.is_empty();
    if layout == Layout::Repository {
        anyhow::ensure!(
            !flags_given,
            "--input and --output apply when {} holds a single *.pt file; it holds a \
             repository <model>/<version>/, whose manifests give the inputs and outputs",
            dir.display()
        );
        if let Some(name) = &config.model_name {
            // KServe's runtime always passes --model-name: a repository keeps its names.
            tracing::info!(
                model_name = %name,
                "{} holds a repository: its models keep their own names (--model-name applies to one model)",
                dir.display()
            );
        }
        return Ok((dir.clone(), None));
    }
    if !matches!(layout, Layout::TorchScript(_)) {
        anyhow::ensure!(
            !flags_given,
            "--input and --output describe a bare TorchScript file; {} holds a {}, whose \
             inputs and outputs are its own",
            dir.display(),
            if layout == Layout::Bundle {
                "bundle"
            } else {
                "SavedModel"
            }
        );
    }
    let view = tempfile::Builder::new()
        .prefix("nnserve-model-")
        .tempdir()?;
    let original = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", dir.display()))?;
    let name = match (&config.model_name, &layout) {
        (Some(n), _) => n.clone(),
        (None, Layout::Bundle) => read_manifest(dir)?.bundle.name,
        (None, _) => anyhow::bail!(
            "{} holds one model without a name: give it one with --model-name NAME \
             (NNSERVE_MODEL_NAME; KServe's runtime passes --model-name={{{{.Name}}}})",
            dir.display()
        ),
    };
    crate::names::check_name("--model-name", &name).map_err(anyhow::Error::msg)?;
    let model_dir = view.path().join(&name);
    std::fs::create_dir(&model_dir)?;
    match &layout {
        Layout::Bundle => {
            let version = read_manifest(dir)?.bundle.version;
            crate::lifecycle::serve_as(&name);
            std::os::unix::fs::symlink(&original, model_dir.join(version.to_string()))?;
            tracing::info!(model = %name, version, from = %dir.display(), "serving one bundle");
        }
        Layout::TfServing(versions) => {
            for v in versions {
                let at = original.join(v.to_string());
                std::os::unix::fs::symlink(&at, model_dir.join(v.to_string()))?;
            }
            tracing::info!(model = %name, ?versions, from = %dir.display(), "serving a TF Serving model base path");
        }
        Layout::TorchScript(file) => {
            let version = model_dir.join("1");
            std::fs::create_dir_all(version.join("model"))?;
            let manifest = torchscript_manifest(&name, &config.model_inputs, &config.model_outputs)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            std::fs::write(version.join("bundle.toml"), manifest)?;
            let to = version.join("model").join("model.pt");
            if std::fs::hard_link(file, &to).is_err() {
                std::fs::copy(file, &to).map_err(|e| {
                    anyhow::anyhow!("cannot copy {} into {}: {e}", file.display(), to.display())
                })?;
            }
            tracing::info!(model = %name, from = %file.display(), "serving a bare TorchScript file");
        }
        Layout::Repository => unreachable!(),
    }
    Ok((view.path().to_path_buf(), Some(view)))
}

fn read_manifest(dir: &Path) -> anyhow::Result<crate::bundle::Manifest> {
    let path = dir.join("bundle.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    crate::bundle::parse_manifest(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A bundle manifest for a bare TorchScript file from `NAME:DTYPE:DIMS` specs.
pub fn torchscript_manifest(
    name: &str,
    inputs: &[String],
    outputs: &[String],
) -> Result<String, String> {
    if inputs.is_empty() || outputs.is_empty() {
        return Err(
            "a bare TorchScript file needs its inputs and outputs: --input \
                    NAME:DTYPE:DIMS and --output NAME:DTYPE:DIMS (e.g. --input \
                    input:fp32:-1,4 --output output:fp32:-1,3), or NNSERVE_INPUTS and \
                    NNSERVE_OUTPUTS"
                .into(),
        );
    }
    let list = |specs: &[String]| -> Result<String, String> {
        let items: Result<Vec<String>, String> = specs.iter().map(|s| tensor_spec(s)).collect();
        Ok(items?.join(", "))
    };
    Ok(format!(
        "# Made by nnserve from --model-name, --input and --output.\n\
         [bundle]\nname = \"{name}\"\nversion = 1\n\n[model]\nbackend = \"torchscript\"\n\
         path = \"model/model.pt\"\ndevice = \"auto\"\ninputs = [{}]\noutputs = [{}]\n",
        list(inputs)?,
        list(outputs)?
    ))
}

/// `NAME:DTYPE:DIMS` as a manifest's inline table.
fn tensor_spec(spec: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "`{}`: {why}; write NAME:DTYPE:DIMS, e.g. input:fp32:-1,4",
            spec.chars().take(64).collect::<String>()
        )
    };
    let mut parts = spec.trim().splitn(3, ':');
    let (Some(name), Some(dtype), Some(dims)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("three parts separated by `:` are needed"));
    };
    crate::names::check_name("a tensor name", name).map_err(|e| bad(&e))?;
    let dtype = crate::tensor::DType::ALL
        .into_iter()
        .find(|d| d.manifest_name() == dtype)
        .ok_or_else(|| {
            bad("unknown dtype (bool, uint8, int8, int16, int32, int64, fp16, bf16, fp32, fp64)")
        })?;
    let dims: Result<Vec<i64>, _> = dims.split(',').map(|d| d.trim().parse::<i64>()).collect();
    let dims =
        dims.map_err(|_| bad("the dimensions are integers separated by `,`, -1 for a free one"))?;
    if dims.is_empty() || dims.iter().any(|&d| d < -1 || d == 0) {
        return Err(bad("each dimension is positive, or -1 for a free one"));
    }
    let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    Ok(format!(
        "{{ name = \"{name}\", dtype = \"{}\", shape = [{}] }}",
        dtype.manifest_name(),
        dims.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_told_apart() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        assert_eq!(detect(d).unwrap(), Layout::Repository, "empty");
        std::fs::write(d.join("model.pt"), b"x").unwrap();
        assert_eq!(detect(d).unwrap(), Layout::TorchScript(d.join("model.pt")));
        std::fs::create_dir_all(d.join("mlp/1")).unwrap();
        assert_eq!(
            detect(d).unwrap(),
            Layout::Repository,
            "a file beside a model"
        );
        std::fs::remove_file(d.join("model.pt")).unwrap();
        std::fs::remove_dir_all(d.join("mlp")).unwrap();
        for v in ["3", "1"] {
            std::fs::create_dir_all(d.join(v)).unwrap();
            std::fs::write(d.join(v).join("saved_model.pb"), b"x").unwrap();
        }
        assert_eq!(detect(d).unwrap(), Layout::TfServing(vec![1, 3]));
        std::fs::write(d.join("bundle.toml"), b"").unwrap();
        assert_eq!(detect(d).unwrap(), Layout::Bundle);
    }

    #[test]
    fn flags_make_a_manifest_and_bad_ones_say_how() {
        let m = torchscript_manifest(
            "mlp",
            &["input:fp32:-1,4".into()],
            &["output:fp32:-1,3".into()],
        )
        .unwrap();
        let parsed = crate::bundle::parse_manifest(&m).unwrap();
        assert_eq!(parsed.bundle.name, "mlp");
        for bad in [
            "input:fp32",
            "in put:fp32:-1",
            "x:float:-1",
            "x:fp32:-1,a",
            "x:fp32:0",
        ] {
            let e = torchscript_manifest("m", &[bad.into()], &["y:fp32:-1".into()]).unwrap_err();
            assert!(e.contains("NAME:DTYPE:DIMS"), "{bad}: {e}");
        }
        assert!(torchscript_manifest("m", &[], &[])
            .unwrap_err()
            .contains("--input"));
    }
}
