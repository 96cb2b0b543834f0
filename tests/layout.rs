//! The tree reads as the architecture: one folder per part under src/, the shared pieces at the top,
//! no `crate::` import circle between parts, and the interpreter (the hot path) importing only the
//! shared leaves it needs, so it could be built alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The part a file belongs to: its folder under src/, or its own name for a top-level file.
fn part(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// Every part a source text names through `crate::`, in paths and in `use crate::{a, b::c}` groups.
fn named_parts(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rs_files(&src(), &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = part(f);
        let text = std::fs::read_to_string(f).unwrap();
        let to: Vec<String> = named_parts(&text).into_iter().filter(|t| *t != from).collect();
        g.entry(from).or_default().extend(to);
    }
    g
}

/// A circle through `start`, if any (depth-first over the part graph).
fn circle(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_import_circle_between_parts() {
    let g = graph();
    for p in g.keys() {
        if let Some(c) = circle(&g, p) {
            panic!("import circle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_check_sees_a_circle_when_there_is_one() {
    let text_a = "use crate::b::x;\n";
    let text_b = "use crate::{arch, a::y};\n// crate::ignored\n";
    assert_eq!(named_parts(text_b), BTreeSet::from(["arch".to_string(), "a".to_string()]));
    let g = BTreeMap::from([("a".to_string(), named_parts(text_a)), ("b".to_string(), named_parts(text_b))]);
    assert_eq!(circle(&g, "a"), Some(vec!["a".into(), "b".into(), "a".into()]));
}

#[test]
fn the_interpreter_imports_only_the_shared_leaves() {
    let g = graph();
    let allowed = BTreeSet::from(["arch".to_string(), "error".to_string(), "logging".to_string()]);
    let got = &g["interp"];
    assert!(got.is_subset(&allowed), "src/interp/ imports {got:?}; only {allowed:?} may be");
    // The shared pieces import no part, so any part may use them.
    for leaf in ["arch", "error", "logging", "util"] {
        let parts: BTreeSet<&String> =
            g[leaf].iter().filter(|p| !["arch", "error", "logging", "util"].contains(&p.as_str())).collect();
        assert!(parts.is_empty(), "src/{leaf}.rs imports {parts:?}");
    }
}

#[test]
fn at_most_six_files_at_the_top_of_src() {
    let top: Vec<String> = std::fs::read_dir(src())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(top.len() <= 6, "{top:?}");
}
