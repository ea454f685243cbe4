//! Tidy checks over the repository's own text, as rust-analyzer keeps them: every test that
//! README's "Results" table names exists, every test the docs cite exists, and no test passes
//! by skipping its work.
//!
//! A test that cannot run here (no such CPU feature, a file or variable it needs is absent) is
//! marked `#[ignore = "why, and how to run it"]`, so that `cargo test` reports it as ignored
//! instead of as a pass. Kernel tests run the kernels this CPU has through
//! `harma_kernels::testing` (`HARMA_REQUIRE_KERNELS` makes a missing one a failure), the one
//! sanctioned way to leave a kernel out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every `.rs` file under `dir` (build trees left out).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A `#[test]` function: where it is, its attributes and its body's lines.
#[derive(Debug)]
struct TestFn {
    name: String,
    at: String,
    attrs: Vec<String>,
    body: Vec<String>,
}

impl TestFn {
    fn ignored(&self) -> bool {
        self.attrs.iter().any(|a| a.starts_with("#[ignore"))
    }
}

/// The test functions of a file: a `#[test]` attribute, the attributes and doc comments
/// around it, the `fn` line, and the body up to its closing brace.
fn tests_in(path: &Path, text: &str) -> Vec<TestFn> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = vec![];
    let rel = path
        .strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "#[test]" {
            continue;
        }
        let mut attrs = vec![];
        let mut j = i;
        while j > 0 && lines[j - 1].trim_start().starts_with("#[") {
            j -= 1;
            attrs.push(lines[j].trim().to_string());
        }
        let mut k = i + 1;
        while k < lines.len() && !lines[k].contains("fn ") {
            attrs.push(lines[k].trim().to_string());
            k += 1;
        }
        let Some(fn_line) = lines.get(k) else {
            continue;
        };
        let name = fn_line
            .split("fn ")
            .nth(1)
            .and_then(|r| r.split(['(', '<']).next())
            .unwrap_or_default()
            .trim()
            .to_string();
        // the body: braces counted from the fn line (format strings' braces are balanced)
        let mut depth = 0i64;
        let mut body = vec![];
        let mut opened = false;
        for l in &lines[k..] {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            body.push(l.to_string());
            if opened && depth <= 0 {
                break;
            }
        }
        out.push(TestFn {
            name,
            at: format!("{rel}:{}", k + 1),
            attrs,
            body,
        });
    }
    out
}

/// Every Rust source of the workspace (crates/ and xtask/) with its text, by path.
fn sources() -> Vec<(PathBuf, String)> {
    let mut files = vec![];
    rust_files(&root().join("crates"), &mut files);
    rust_files(&root().join("xtask"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text)
        })
        .collect()
}

fn all_tests() -> Vec<TestFn> {
    sources()
        .iter()
        .flat_map(|(f, text)| tests_in(f, text))
        .collect()
}

/// The rows of README's "Results" table: (check, the tests it names).
fn results_rows() -> Vec<(String, Vec<String>)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Results")
        .nth(1)
        .expect("README has a Results section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = vec![];
    let mut header: Option<usize> = None;
    for line in section.lines().filter(|l| l.starts_with('|')) {
        // a `\|` inside a cell is a pipe of its text, not a cell's edge
        let line = line.replace("\\|", "\u{1}");
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if let Some(col) = cells.iter().position(|c| c.eq_ignore_ascii_case("test")) {
            header = Some(col);
            continue;
        }
        let Some(col) = header else { continue };
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        let names = cells
            .get(col)
            .unwrap_or(&"")
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|s| s.rsplit("::").next().unwrap().to_string())
            .collect();
        rows.push((cells[0].to_string(), names));
    }
    rows
}

/// Every row of README's "Results" table names at least one test, and each exists (not
/// ignored: a row states what `cargo test` proves).
#[test]
fn every_result_in_the_readme_names_a_test_that_exists() {
    let tests = all_tests();
    let by_name: BTreeMap<&str, &TestFn> = tests.iter().map(|t| (t.name.as_str(), t)).collect();
    let rows = results_rows();
    assert!(
        rows.len() >= 20,
        "README's Results table has {} rows: the table's header needs a `test` column",
        rows.len()
    );
    let mut problems = vec![];
    for (check, names) in &rows {
        if names.is_empty() {
            problems.push(format!("`{check}`: names no test"));
        }
        for n in names {
            match by_name.get(n.as_str()) {
                None => problems.push(format!("`{check}`: no test `{n}`")),
                Some(t) if t.ignored() => {
                    problems.push(format!("`{check}`: `{n}` ({}) is ignored", t.at))
                }
                Some(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "README Results:\n{}",
        problems.join("\n")
    );
}

/// Every function name that README.md or docs/*.md cite in backticks (snake_case with at
/// least three underscores: the shape of our test names) is a function in the code: a doc
/// cannot cite a test that was renamed or removed.
#[test]
fn every_test_the_docs_cite_exists() {
    let code: String = sources().into_iter().map(|(_, text)| text + "\n").collect();
    let mut docs = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push(e.path());
        }
    }
    let mut missing = vec![];
    let mut cited = 0;
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for name in text.split('`').skip(1).step_by(2) {
            let looks_like_fn = name.split('_').count() >= 4
                && name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !looks_like_fn {
                continue;
            }
            cited += 1;
            if !code.contains(&format!("fn {name}(")) && !code.contains(&format!("fn {name}<")) {
                let doc = doc.strip_prefix(root()).unwrap().display().to_string();
                missing.push(format!("{doc}: `{name}`"));
            }
        }
    }
    assert!(cited >= 30, "found only {cited} cited names");
    assert!(
        missing.is_empty(),
        "cited but not in the code:\n{}",
        missing.join("\n")
    );
}

/// What a skip looks like: the test looks at the machine (a CPU feature, an environment
/// variable, a file) and returns or moves on when it is not as wanted.
const LOOKS: &[&str] = &[
    "env::var",
    "var_os(",
    "is_x86_feature_detected",
    ".available()",
    ".exists()",
];

/// Where a test's body skips: a `return` or `continue` within two lines of a look at the
/// machine, or a message that says it skipped.
fn skips(t: &TestFn) -> Vec<String> {
    let mut found = vec![];
    for (i, l) in t.body.iter().enumerate() {
        if l.contains("skipped") && (l.contains("eprintln!") || l.contains("println!")) {
            found.push(format!("{}: prints that it skipped: {}", t.at, l.trim()));
        }
        if !(l.contains("return") || l.contains("continue")) || l.contains("testing::runs(") {
            continue;
        }
        let from = i.saturating_sub(2);
        let window = &t.body[from..=i];
        if window.iter().any(|w| w.contains("testing::runs(")) {
            continue;
        }
        if let Some(look) = LOOKS
            .iter()
            .find(|look| window.iter().any(|w| w.contains(**look)))
        {
            found.push(format!(
                "{} `{}`: returns after `{look}`: {}",
                t.at,
                t.name,
                l.trim()
            ));
        }
    }
    found
}

/// No test passes by skipping: one that returns early on a missing CPU feature, environment
/// variable or file is marked `#[ignore]` with its reason instead.
#[test]
fn no_test_passes_by_skipping() {
    let tests = all_tests();
    assert!(tests.len() > 100, "found only {} tests", tests.len());
    let found: Vec<String> = tests
        .iter()
        .filter(|t| !t.ignored())
        .flat_map(skips)
        .collect();
    assert!(found.is_empty(), "tests that skip (mark them #[ignore = \"why\"] or run through harma_kernels::testing):\n{}", found.join("\n"));
    // an ignored test says why
    let bare: Vec<&str> = tests
        .iter()
        .filter(|t| t.attrs.iter().any(|a| a == "#[ignore]"))
        .map(|t| t.at.as_str())
        .collect();
    assert!(bare.is_empty(), "#[ignore] without a reason: {bare:?}");
}

/// The checks above find what they look for (on a made-up file, fixtures/tidy_sample.rs.txt).
#[test]
fn the_tidy_checks_see_skips_and_tests() {
    let path = root().join("xtask/tests/fixtures/tidy_sample.rs.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let tests = tests_in(&path, &text);
    let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(skips(&tests[0]).len(), 1, "{:?}", skips(&tests[0]));
    assert!(tests[1].ignored() && !tests[0].ignored());
    assert!(skips(&tests[2]).is_empty(), "{:?}", skips(&tests[2]));
    assert_eq!(tests[2].body.len(), 6);
    assert_eq!(skips(&tests[3]).len(), 1, "{:?}", skips(&tests[3]));
}

/// Unsafe code lives in harma-kernels alone, and there every unsafe block says why it is
/// sound: every other crate root forbids it, and the kernels crate denies clippy's
/// `undocumented_unsafe_blocks` (so `cargo clippy` fails on an unexplained block).
#[test]
fn unsafe_code_is_confined_and_explained() {
    let mut roots = vec![root().join("xtask/src/main.rs")];
    for e in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        for f in ["src/lib.rs", "src/main.rs"] {
            let p = e.path().join(f);
            if p.exists() {
                roots.push(p);
            }
        }
    }
    assert!(roots.len() >= 11, "{roots:?}");
    for p in roots {
        let text = std::fs::read_to_string(&p).unwrap();
        let rel = p.strip_prefix(root()).unwrap().display().to_string();
        if rel.starts_with("crates/harma-kernels/") {
            assert!(
                text.contains("#![deny(clippy::undocumented_unsafe_blocks)]"),
                "{rel}: deny clippy::undocumented_unsafe_blocks"
            );
        } else {
            assert!(
                text.contains("#![forbid(unsafe_code)]"),
                "{rel}: forbid unsafe code"
            );
        }
    }
}
