//! The gateway's modules depend on each other leaf to root, never in a cycle: this test reads
//! the sources, lists each module's uses of other modules (`crate::…`, `super::…`, a parent's
//! `child::…`; unit tests left out), prints that graph (`--nocapture`), and checks every use
//! points to a lower layer of [`LAYERS`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The crate's modules by layer, leaf first: a module may use only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &[
        "vocab",
        "close",
        "cursors",
        "tokens",
        "region::allow",
        "boot",
    ],
    &["limits", "metrics", "region::disconnects"],
    &["socket"],
    &["outbox"],
    &["history"],
    &["upstream"],
    &["hub::state"],
    &["hub"],
    &[
        "presence::caps",
        "presence::reports",
        "presence::session",
        "presence::watchers",
    ],
    &["presence"],
    &["region::state"],
    &["tickets"],
    &["connection::context", "connection::writer"],
    &["connection::delivery", "connection::inbound"],
    &["connection"],
    &["region::report", "listener", "admission"],
    &["region"],
    &["http", "config"],
    &["crate"],
    &["run"],
];

/// Module name -> (its source without unit tests, the modules it declares).
type Sources = BTreeMap<String, (String, Vec<String>)>;

/// Module name -> the modules it uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every module of the crate but the test-only ones, read from `src`.
fn sources(src: &Path) -> Sources {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("the source folder reads") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut sources = Sources::new();
    for path in files {
        let rel = path.strip_prefix(src).expect("under src");
        let rel = rel.with_extension("");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let name = match parts.as_slice() {
            [lib] if lib == "lib" => "crate".to_string(),
            [.., last] if last == "tests" || last == "layering" => continue,
            [dirs @ .., last] if last == "mod" => dirs.join("::"),
            all => all.join("::"),
        };
        let text = std::fs::read_to_string(&path).expect("a source file reads");
        // Unit tests sit at the end of a file, in `mod tests { … }`.
        let code = match text.find("#[cfg(test)]\nmod tests {") {
            Some(at) => text[..at].to_string(),
            None => text,
        };
        let children = code
            .lines()
            .filter_map(|l| {
                let l = l.trim().strip_prefix("pub ").unwrap_or(l.trim());
                l.strip_prefix("mod ")?
                    .strip_suffix(';')
                    .map(str::to_string)
            })
            .filter(|c| c != "tests" && c != "layering")
            .collect();
        sources.insert(name, (code, children));
    }
    sources
}

/// The paths written right after each `at` in `code` that starts a path (`crate::a::b`,
/// `crate::{a, b::{c, d}}`), as their segments.
fn paths_after(code: &str, at: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for (i, _) in code.match_indices(at) {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = code[i + at.len()..].chars().peekable();
        tree(&mut rest, Vec::new(), &mut paths);
    }
    paths
}

/// Reads one use tree from `s` (a path, or a `{…}` group of trees) under `prefix`.
fn tree(
    s: &mut std::iter::Peekable<std::str::Chars<'_>>,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) {
    while s.next_if(|c| c.is_whitespace()).is_some() {}
    if s.next_if_eq(&'{').is_some() {
        loop {
            tree(s, prefix.clone(), out);
            while s.next_if(|c| c.is_whitespace()).is_some() {}
            match s.next() {
                Some(',') => continue,
                _ => return,
            }
        }
    }
    let mut ident = String::new();
    while let Some(c) = s.next_if(|c| c.is_alphanumeric() || *c == '_') {
        ident.push(c);
    }
    let mut path = prefix;
    if !ident.is_empty() {
        path.push(ident);
    }
    let mut ahead = s.clone();
    if ahead.next() == Some(':') && ahead.next() == Some(':') {
        *s = ahead;
        tree(s, path, out);
    } else if !path.is_empty() {
        out.push(path);
    }
}

/// The longest module of `modules` that `path` (from the crate root) names, else the root.
fn resolve(path: &[String], modules: &Sources) -> String {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains_key(m))
        .unwrap_or_else(|| "crate".to_string())
}

/// Which modules each module uses.
fn graph(sources: &Sources) -> Graph {
    let mut graph = Graph::new();
    for (name, (code, children)) in sources {
        let mut uses = BTreeSet::new();
        for path in paths_after(code, "crate::") {
            uses.insert(resolve(&path, sources));
        }
        // `super::` from `a::b` is `a`, from a top module the root.
        let parent: Vec<String> = match name.rsplit_once("::") {
            Some((parent, _)) => parent.split("::").map(str::to_string).collect(),
            None => Vec::new(),
        };
        for path in paths_after(code, "super::") {
            uses.insert(resolve(&[parent.clone(), path].concat(), sources));
        }
        let own: Vec<String> = match name.as_str() {
            "crate" => Vec::new(),
            _ => name.split("::").map(str::to_string).collect(),
        };
        for child in children {
            for path in paths_after(code, &format!("{child}::")) {
                let full = [own.clone(), vec![child.clone()], path].concat();
                uses.insert(resolve(&full, sources));
            }
        }
        uses.remove(name);
        graph.insert(name.clone(), uses);
    }
    graph
}

/// A cycle of `graph`, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a Graph,
        done: &mut BTreeSet<&'a str>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            return Some(path[at..].iter().map(|n| n.to_string()).collect());
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, done, path) {
                return Some(found);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn modules_depend_leaf_to_root_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&sources(&src));
    for (module, uses) in &graph {
        let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
        println!("{module:22} -> {}", uses.join(", "));
    }
    assert_eq!(cycle(&graph), None, "a cycle among the modules");
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    for (module, uses) in &graph {
        let Some(own) = layer(module) else {
            panic!("module {module} is in no layer of LAYERS");
        };
        for used in uses {
            let below = layer(used).is_some_and(|l| l < own);
            assert!(below, "{module} uses {used}, which is not in a lower layer");
        }
    }
}

#[test]
fn use_trees_are_read_whole() {
    let code = "use crate::{a::{b, c::D}, e};\nlet x = crate::f::g(super::h);";
    let paths: Vec<String> = paths_after(code, "crate::")
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(paths, ["a::b", "a::c::D", "e", "f::g"]);
    assert_eq!(paths_after(code, "super::"), [vec!["h".to_string()]]);
    // A path inside another (`a::crate::x`) is not one of the crate's.
    assert!(paths_after("b::crate::x", "crate::").is_empty());
}

#[test]
fn a_cycle_is_found() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph = Graph::new();
        for (from, to) in edges {
            graph
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            graph.entry(to.to_string()).or_default();
        }
        graph
    };
    assert_eq!(cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let found = cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]));
    assert_eq!(found.map(|c| c.len()), Some(3));
}
