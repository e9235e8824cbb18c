//! The library's layering, as the README states it: which module may import which.
//!
//! The README's "Who may import whom" table (between the `layering:begin` and `layering:end`
//! markers) is the rule; this test reads every `crate::…` path in `src/` (comments and string
//! literals left out, `use crate::{a, b::c}` groups unfolded) and fails on an import the table
//! does not allow, on a module of `src/` the table does not place, and on a table whose allowed
//! imports could form a circle. `lib` is the crate root (items defined or re-exported in
//! `lib.rs`); a module's own files and `testutil` (test helpers) are always allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The table of the README: module -> the modules it may import.
fn allowed() -> Graph {
    let readme = fs::read_to_string(root().join("README.md")).expect("read README.md");
    let start = readme
        .find("<!-- layering:begin -->")
        .expect("README.md has a `<!-- layering:begin -->` marker");
    let end = readme
        .find("<!-- layering:end -->")
        .expect("README.md has a `<!-- layering:end -->` marker");
    let mut table = Graph::new();
    for line in readme[start..end].lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        if cells.len() != 2 || !cells[0].contains('`') {
            continue;
        }
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        for module in names(cells[0]) {
            let previous = table.insert(module.clone(), names(cells[1]));
            assert!(previous.is_none(), "README.md places `{module}` twice");
        }
    }
    assert!(!table.is_empty(), "the README's layering table is empty");
    table
}

/// `text` without comments, string and char literals (replaced by spaces), so that a path in
/// a doc comment or a message is not an import.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !is_ident(b[i - 1])) =>
            {
                // A raw string: r"…", r#"…"#, …
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let open = i + 1 + hashes;
                if b.get(open) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat(b'#').take(hashes))
                    .collect();
                i = open + 1;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push(' ');
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push(' ');
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): skip only the former.
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|&c| c == b'\'')
                        .map(|p| i + 3 + p)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 3)
                } else {
                    None
                };
                match end {
                    Some(e) => {
                        out.push(' ');
                        i = e;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                // Whole UTF-8 characters: `text` is valid UTF-8 and we only cut at ASCII.
                let len = utf8_len(b[i]);
                out.push_str(&text[i..i + len]);
                i += len;
            }
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The first segments of every `crate::` path in `code` (`crate::{a, b::c}` gives `a`, `b`).
fn crate_paths(code: &str) -> Vec<String> {
    let b = code.as_bytes();
    let mut heads = Vec::new();
    let mut from = 0;
    while let Some(p) = code[from..].find("crate::") {
        let at = from + p;
        from = at + "crate::".len();
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$') {
            continue; // `$crate::`, `my_crate::`
        }
        let rest = code[from..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        heads.extend(head(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 {
                    item.push(c);
                }
            }
            heads.extend(head(&item));
        } else {
            heads.extend(head(rest));
        }
    }
    heads
}

/// The leading identifier of a path.
fn head(path: &str) -> Option<String> {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|&c| c.is_ascii_alphanumeric() || c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/ entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The library's modules (top-level names under `src/`, `lib` for the root) and what each
/// imports, with the file of the first import of each edge.
fn actual() -> (BTreeSet<String>, BTreeMap<(String, String), PathBuf>) {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |file: &Path| -> Option<String> {
        let rel = file.strip_prefix(&src).expect("under src/");
        let first = rel.components().next()?.as_os_str().to_str()?.to_string();
        match first.as_str() {
            "bin" => None, // separate crates: they see only the public API
            "lib.rs" => Some("lib".into()),
            f => Some(f.trim_end_matches(".rs").to_string()),
        }
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(file) else {
            continue;
        };
        let text = fs::read_to_string(file).expect("read a source file");
        for name in crate_paths(&code_only(&text)) {
            let to = if modules.contains(&name) && name != "lib" {
                name
            } else {
                "lib".to_string() // an item of the crate root
            };
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_insert_with(|| file.clone());
            }
        }
    }
    (modules, edges)
}

/// A circle in `graph`, if there is one.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut c = path[i..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

#[test]
fn every_import_is_one_the_readme_allows_and_the_allowed_imports_form_no_circle() {
    let table = allowed();
    if let Some(c) = circle(&table) {
        panic!(
            "the README's layering table allows a circle: {}",
            c.join(" -> ")
        );
    }
    let (modules, edges) = actual();
    let mut problems: Vec<String> = modules
        .iter()
        .filter(|m| !table.contains_key(*m))
        .map(|m| format!("`{m}` is a module of src/ that the table does not place"))
        .collect();
    problems.extend(
        table
            .keys()
            .filter(|m| !modules.contains(*m))
            .map(|m| format!("`{m}` is in the table but not a module of src/")),
    );
    problems.extend(
        edges
            .iter()
            .filter(|((from, to), _)| {
                to != "testutil" && table.get(from).is_some_and(|may| !may.contains(to))
            })
            .map(|((from, to), file)| {
                format!(
                    "{from} imports {to} ({})",
                    file.strip_prefix(root()).unwrap_or(file).display()
                )
            }),
    );
    assert!(
        problems.is_empty(),
        "the code and the README's layering table disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_import_reader_sees_paths_in_code_and_groups_but_not_in_comments_or_strings() {
    let code = code_only(
        "use crate::{cuda::{self, Error}, os};\n\
         // crate::commented\n/* crate::block /* nested */ crate::still */\n\
         let s = \"crate::string\"; let r = r#\"crate::raw\"#; let c = '\"';\n\
         fn f<'a>(x: &'a u8) { crate::visible::read(x); $crate::macro_path; }\n\
         /// crate::doc\npub use crate::files as f;",
    );
    assert_eq!(crate_paths(&code), ["cuda", "os", "visible", "files"]);
}

#[test]
fn a_circle_in_the_table_is_found() {
    let graph: Graph = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(circle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let acyclic: Graph = [("a", &["b"][..]), ("b", &[])]
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(circle(&acyclic), None);
}
