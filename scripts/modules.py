#!/usr/bin/env python3
"""The module map of host/src, as the layout unit test (host/src/layout_tests.rs) checks it.

Prints each top-level module of the `nnserve` crate (a file `x.rs` or a folder `x/`,
counted as one module) with its line count, its largest file and its outgoing edges, then
every file over the line limit and every import cycle between top-level modules.

An edge A -> B exists when code in module A names `crate::B` (in a `use` or in a path,
`crate::{B, ..}` included). Comments and string literals are ignored; `super::` cannot
leave a module, so it adds no edge. Edges from `wit` are left out: its bindgen `with:`
mapping names the `nn` and `plugin` types that the generated bindings use.

Usage: python3 scripts/modules.py [SRC_DIR]   (default: host/src beside this script)
Exit status: 0 when no file is over the limit and there is no cycle, 1 otherwise.
"""

import os
import re
import sys

MAX_LINES = 800
# Crate roots, not modules: lib.rs declares the modules, main.rs is the binary (it names the
# library as `nnserve::`).
ROOTS = {"lib.rs", "main.rs"}
# The generated bindings: its `with:` mapping names nn/plugin types and is no dependency.
NO_EDGES_FROM = {"wit"}


def strip_comments_and_strings(src: str) -> str:
    """Source with comments and the contents of string/char literals blanked out."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        nxt = src[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            while i < n and src[i] != "\n":
                i += 1
            continue
        if c == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
            continue
        prev = src[i - 1] if i > 0 else ""
        if c == "r" and not (prev.isalnum() or prev == "_"):
            m = re.match(r'r(#*)"', src[i:])
            if m:
                close = '"' + m.group(1)
                end = src.find(close, i + len(m.group(0)))
                i = n if end < 0 else end + len(close)
                out.append('""')
                continue
        if c == '"':
            i += 1
            while i < n and src[i] != '"':
                i += 2 if src[i] == "\\" else 1
            i += 1
            out.append('""')
            continue
        if c == "'":
            if nxt == "\\":
                end = src.find("'", i + 3)
                i = n if end < 0 else end + 1
                out.append("' '")
                continue
            if i + 2 < n and src[i + 2] == "'":
                i += 3
                out.append("' '")
                continue
        out.append(c)
        i += 1
    return "".join(out)


CRATE_PATH = re.compile(r"(?<![\w$])crate\s*::\s*(\{|[A-Za-z_]\w*)")


def mentioned_modules(code: str):
    """Top-level modules named as `crate::m` or inside `crate::{m, m2::x, ..}`."""
    found = set()
    for m in CRATE_PATH.finditer(code):
        if m.group(1) != "{":
            found.add(m.group(1))
            continue
        # A grouped import: the first segment of each item at depth 1.
        depth, j, item_start = 1, m.end(), m.end()
        items = []
        while j < len(code) and depth:
            ch = code[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    items.append(code[item_start:j])
            elif ch == "," and depth == 1:
                items.append(code[item_start:j])
                item_start = j + 1
            j += 1
        for item in items:
            first = re.match(r"\s*([A-Za-z_]\w*)", item)
            if first and first.group(1) != "self":
                found.add(first.group(1))
    return found


def scan(src_dir):
    """(modules {name: [(relpath, lines)]}, edges {name: set})."""
    modules, edges = {}, {}
    for dirpath, _, files in os.walk(src_dir):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src_dir)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
            if rel in ROOTS:
                modules.setdefault("(crate root)", []).append((rel, lines))
                continue
            top = rel.split(os.sep)[0]
            name = top[:-3] if top.endswith(".rs") else top
            modules.setdefault(name, []).append((rel, lines))
            targets = edges.setdefault(name, set())
            if name in NO_EDGES_FROM:
                continue
            for m in mentioned_modules(strip_comments_and_strings(text)):
                if m != name:
                    targets.add(m)
    for name in edges:
        edges[name] = {t for t in edges[name] if t in edges}
    return modules, edges


def cycles(edges):
    """Every elementary cycle, each once, starting at its smallest module."""
    found = []
    nodes = sorted(edges)
    for start in nodes:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for t in sorted(edges[node], reverse=True):
                if t == start:
                    found.append(path + [start])
                elif t > start and t not in path:
                    stack.append((t, path + [t]))
    return sorted(found, key=lambda c: (len(c), c))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    src_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "host", "src")
    modules, edges = scan(src_dir)
    print(f"{'module':<14} {'files':>5} {'lines':>6} {'largest':>7}  edges")
    for name in sorted(modules):
        files = modules[name]
        total = sum(n for _, n in files)
        largest = max(n for _, n in files)
        out = ", ".join(sorted(edges.get(name, ()))) or "-"
        print(f"{name:<14} {len(files):>5} {total:>6} {largest:>7}  {out}")
    over = sorted(
        ((rel, n) for files in modules.values() for rel, n in files if n > MAX_LINES),
        key=lambda x: -x[1],
    )
    print(f"\nfiles over {MAX_LINES} lines: {len(over)}")
    for rel, n in over:
        print(f"  {rel}: {n}")
    cyc = cycles(edges)
    print(f"\nimport cycles between top-level modules: {len(cyc)}")
    for c in cyc:
        print("  " + " -> ".join(c))
    return 1 if over or cyc else 0


if __name__ == "__main__":
    sys.exit(main())
