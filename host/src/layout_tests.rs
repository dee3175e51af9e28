//! The layout of `host/src`, checked (ARCHITECTURE.md, STYLE.md): files small enough to
//! read in one sitting, and one-way dependencies between the top-level modules.
//!
//! It reads the source tree, not the compiled crate. A top-level module is a file `x.rs`
//! or a folder `x/`, counted as one; `lib.rs` and `main.rs` are the crate's roots, not
//! modules. An edge A → B exists when code of A names `crate::B` (in a `use` or a path,
//! `crate::{B, ..}` included); comments and string literals do not count, and `super::`
//! cannot leave a module. Edges from `wit` are left out: its bindgen `with:` mapping names
//! the `nn` and `plugin` types the generated bindings use. `scripts/modules.py` prints the
//! same map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The most lines a file under `host/src` may have, tests included.
const MAX_LINES: usize = 800;

/// Modules whose outgoing edges are not dependencies (generated bindings).
const NO_EDGES_FROM: &[&str] = &["wit"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source with comments and the contents of string and char literals removed.
fn code_only(src: &str) -> String {
    let s: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 1;
            i += 2;
            while i < s.len() && depth > 0 {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            out.push(' ');
            continue;
        }
        if c == 'r' && (i == 0 || !ident(s[i - 1])) {
            let mut j = i + 1;
            while s.get(j) == Some(&'#') {
                j += 1;
            }
            if s.get(j) == Some(&'"') {
                let hashes = j - i - 1;
                let mut k = j + 1;
                while k < s.len()
                    && !(s[k] == '"' && (1..=hashes).all(|h| s.get(k + h) == Some(&'#')))
                {
                    k += 1;
                }
                i = (k + 1 + hashes).min(s.len());
                out.push_str("\"\"");
                continue;
            }
        }
        if c == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
            continue;
        }
        if c == '\'' {
            if next == Some('\\') {
                i += 3;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
                continue;
            }
            if s.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The top-level modules that `code` names as `crate::m` or inside `crate::{m, ..}`.
fn mentioned_modules(code: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate") {
        let start = from + at;
        from = start + "crate".len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| ident(c) || c == '$') {
            continue;
        }
        let rest = code[from..].trim_start();
        let Some(rest) = rest.strip_prefix("::") else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // A grouped import: the first segment of each item at depth 1.
            let mut depth = 1;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        items.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            items.push(item);
            for item in items {
                let name: String = item
                    .trim_start()
                    .chars()
                    .take_while(|&c| ident(c))
                    .collect();
                if !name.is_empty() && name != "self" {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|&c| ident(c)).collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Which top-level modules each one mentions.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Line counts of every `.rs` file (by path from `src`), and the module graph.
fn scan(src: &Path) -> (Vec<(String, usize)>, Graph) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut lines = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let rel = path
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        lines.push((rel.clone(), text.lines().count()));
        if rel == "lib.rs" || rel == "main.rs" {
            continue;
        }
        let top = rel.split('/').next().unwrap();
        let module = top.strip_suffix(".rs").unwrap_or(top).to_string();
        let targets = edges.entry(module.clone()).or_default();
        if NO_EDGES_FROM.contains(&module.as_str()) {
            continue;
        }
        for m in mentioned_modules(&code_only(&text)) {
            if m != module {
                targets.insert(m);
            }
        }
    }
    let known: BTreeSet<String> = edges.keys().cloned().collect();
    for targets in edges.values_mut() {
        targets.retain(|t| known.contains(t));
    }
    (lines, edges)
}

/// Every elementary cycle, each once, starting at its smallest module.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in edges.keys() {
        let mut stack = vec![vec![start.clone()]];
        while let Some(path) = stack.pop() {
            let node = path.last().unwrap();
            for t in edges[node].iter().rev() {
                if t == start {
                    let mut cycle = path.clone();
                    cycle.push(start.clone());
                    found.push(cycle);
                } else if t > start && !path.contains(t) {
                    let mut longer = path.clone();
                    longer.push(t.clone());
                    stack.push(longer);
                }
            }
        }
    }
    found.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    found
}

#[test]
fn the_comment_and_string_filter_sees_only_code() {
    let code = code_only(
        "use crate::a::X; // crate::b\n/* crate::c /* nested */ crate::d */ let s = \"crate::e\";\n\
         let r = r#\"crate::f\"#; let c = '\"'; let t = crate::{g, h::I};\n/// crate::j\n",
    );
    let found: Vec<String> = mentioned_modules(&code).into_iter().collect();
    assert_eq!(found, ["a", "g", "h"]);
}

#[test]
fn cycles_are_found_once_each() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "d")] {
        edges.entry(a.into()).or_default().insert(b.into());
        edges.entry(b.into()).or_default();
    }
    let shown: Vec<String> = cycles(&edges).iter().map(|c| c.join(" -> ")).collect();
    assert_eq!(shown, ["a -> b -> a", "a -> b -> c -> a"]);
}

#[test]
fn no_file_is_too_long_and_the_top_level_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (lines, edges) = scan(&src);
    let mut problems = Vec::new();
    let mut long: Vec<&(String, usize)> = lines.iter().filter(|(_, n)| *n > MAX_LINES).collect();
    long.sort_by_key(|f| std::cmp::Reverse(f.1));
    if !long.is_empty() {
        problems.push(format!(
            "files over {MAX_LINES} lines (split them along their seams):"
        ));
        for (file, n) in long {
            problems.push(format!("  host/src/{file}: {n} lines"));
        }
    }
    let found = cycles(&edges);
    if !found.is_empty() {
        problems.push(
            "import cycles between top-level modules (dependencies must run one way):".into(),
        );
        for c in found {
            problems.push(format!("  {}", c.join(" -> ")));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}
