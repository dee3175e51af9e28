//! The tensor names a TorchScript file holds, for `nnserve plugin new --model`: the
//! parameter names of the root module's `forward`, read from the archive's own code
//! (`code/__torch__/...py`), and how many tensors it returns. TorchScript keeps no dtypes
//! or shapes for them, so those stay placeholders.
//!
//! By hand, not with libtorch: tch does not expose a method's schema, and loading a model
//! to name its inputs would run its constructor code. The archive is a zip (the `zip`
//! crate, already under tch); the root class is the first `GLOBAL` of `data.pkl` (pickle
//! protocol 2, which `torch.jit.save` writes), and the signature is Python text.

use std::io::Read;
use std::path::Path;

/// What `forward` says of itself.
#[derive(Debug, PartialEq)]
pub struct Forward {
    /// Parameter names after `self`, with their TorchScript types (`Tensor`, ...).
    pub inputs: Vec<(String, String)>,
    /// How many tensors it returns: 1 for `Tensor`, n for `Tuple[Tensor, ...]`, `None`
    /// for anything else (a dict, a list).
    pub outputs: Option<usize>,
}

/// The most of one code file read (a generated module is a few KiB).
const MAX_CODE: u64 = 4 << 20;

/// Reads `forward`'s signature from a TorchScript archive, or says why it cannot.
pub fn forward(file: &Path) -> Result<Forward, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("cannot open: {e}"))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| format!("not a TorchScript archive: {e}"))?;
    // Entries are `<archive name>/data.pkl`, `<archive name>/code/...`.
    let pkl = zip
        .file_names()
        .map(str::to_string)
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or("no data.pkl: not a TorchScript archive")?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut head = Vec::new();
    zip.by_name(&pkl)
        .map_err(|e| e.to_string())?
        .take(4096)
        .read_to_end(&mut head)
        .map_err(|e| e.to_string())?;
    let (module, class) = root_class(&head).ok_or("data.pkl does not start with a class")?;
    // `__torch__.Mlp` is in code/__torch__.py, `__torch__.a.B` in code/__torch__/a.py.
    let code_path = format!("{prefix}code/{}.py", module.replace('.', "/"));
    let mut code = String::new();
    zip.by_name(&code_path)
        .map_err(|_| format!("no {code_path} in the archive"))?
        .take(MAX_CODE)
        .read_to_string(&mut code)
        .map_err(|e| e.to_string())?;
    parse_forward(&code, &class).ok_or_else(|| format!("no forward() in class {class}"))
}

/// The module and class of a protocol-2 pickle's first `GLOBAL` (`c<module>\n<name>\n`).
fn root_class(pkl: &[u8]) -> Option<(String, String)> {
    let at = pkl.iter().position(|&b| b == b'c')?;
    let mut lines = pkl[at + 1..].split(|&b| b == b'\n');
    let module = std::str::from_utf8(lines.next()?).ok()?;
    let class = std::str::from_utf8(lines.next()?).ok()?;
    Some((module.to_string(), class.to_string()))
}

/// The signature of `def forward(` inside `class <class>(`.
fn parse_forward(code: &str, class: &str) -> Option<Forward> {
    let start = code.find(&format!("class {class}("))?;
    let body = &code[start..];
    // The class ends where the next top-level statement starts.
    let end = body[1..].find("\nclass ").map_or(body.len(), |i| i + 1);
    let body = &body[..end];
    let def = body.find("def forward(")? + "def forward(".len();
    let rest = &body[def..];
    let close = matching_paren(rest)?;
    let inputs = split_top(&rest[..close])
        .into_iter()
        .filter_map(|p| {
            let (name, ty) = p.split_once(':').unwrap_or((p, "Tensor"));
            let name = name.trim();
            (name != "self" && !name.is_empty()).then(|| (name.to_string(), ty.trim().to_string()))
        })
        .collect();
    let after = &rest[close + 1..];
    let ret = after
        .split_once("->")
        .and_then(|(_, r)| r.split_once(':'))
        .map(|(r, _)| r.trim());
    let outputs = match ret {
        Some("Tensor") => Some(1),
        Some(t) if t.starts_with("Tuple[") && t.ends_with(']') => {
            let parts = split_top(&t[6..t.len() - 1]);
            parts
                .iter()
                .all(|p| p.trim() == "Tensor")
                .then_some(parts.len())
        }
        _ => None,
    };
    Some(Forward { inputs, outputs })
}

/// The index of the `)` that closes the text (which starts just after a `(`).
fn matching_paren(text: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in text.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ']' => depth -= 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Splits at the commas outside brackets; empty parts are dropped.
fn split_top(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut from) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[from..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: &str = "class Other(Module):\n  def forward(self: __torch__.Other,\n    y: Tensor) -> Tensor:\n    return y\nclass Encoder(Module):\n  __parameters__ = []\n  def forward(self: __torch__.Encoder,\n    input_ids: Tensor,\n    attention_mask: Tensor) -> Tuple[Tensor, Tensor]:\n    _0 = (self.net).forward(input_ids, )\n    return (_0, attention_mask)\n";

    #[test]
    fn forward_names_its_inputs_and_counts_its_outputs() {
        let f = parse_forward(CODE, "Encoder").unwrap();
        let names: Vec<&str> = f.inputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["input_ids", "attention_mask"]);
        assert_eq!(f.outputs, Some(2));
        let o = parse_forward(CODE, "Other").unwrap();
        assert_eq!((o.inputs.len(), o.outputs), (1, Some(1)));
        assert!(parse_forward(CODE, "Missing").is_none());
        let dict = "class M(Module):\n  def forward(self: M, x: Dict[str, Tensor]) -> Dict[str, Tensor]:\n    return x\n";
        let f = parse_forward(dict, "M").unwrap();
        assert_eq!(
            f.inputs,
            [("x".to_string(), "Dict[str, Tensor]".to_string())]
        );
        assert_eq!(f.outputs, None);
    }

    #[test]
    fn the_root_class_is_the_pickles_first_global() {
        let pkl = b"\x80\x02c__torch__.a.b\nMlp\nq\x00)\x81}";
        assert_eq!(
            root_class(pkl),
            Some(("__torch__.a.b".to_string(), "Mlp".to_string()))
        );
    }

    #[test]
    fn the_example_mlp_takes_x() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/repository/mlp/1/model/model.pt");
        if !file.exists() {
            // Made by `make setup` (examples/make_models.py).
            panic!("{} is missing: run make setup", file.display());
        }
        let f = forward(&file).unwrap();
        assert_eq!(f.inputs, [("x".to_string(), "Tensor".to_string())]);
        assert_eq!(f.outputs, Some(1));
        assert!(forward(&file.with_file_name("nope.pt")).is_err());
    }
}
