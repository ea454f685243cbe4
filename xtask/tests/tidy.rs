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

/// `text` with comments, string and character literals blanked (newlines kept), so that its
/// braces count blocks.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }))
    };
    let find = |from: usize, pat: &[u8]| {
        (from..b.len())
            .find(|&j| b[j..].starts_with(pat))
            .map_or(b.len(), |j| j + pat.len())
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let raw = c == b'r'
            && (i == 0 || !ident(b[i - 1]) || (b[i - 1] == b'b' && (i < 2 || !ident(b[i - 2]))));
        let end = if b[i..].starts_with(b"//") {
            find(i, b"\n") - 1
        } else if b[i..].starts_with(b"/*") {
            find(i + 2, b"*/")
        } else if raw
            && b[i + 1..].iter().take_while(|&&h| h == b'#').count() + i + 1 < b.len()
            && b[i + 1 + b[i + 1..].iter().take_while(|&&h| h == b'#').count()] == b'"'
        {
            let hashes = b[i + 1..].iter().take_while(|&&h| h == b'#').count();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            find(i + 2 + hashes, &close)
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            j + 1
        } else if c == b'\'' && i + 2 < b.len() && b[i + 1] == b'\\' {
            find(i + 2, b"'")
        } else if c == b'\'' && i + 2 < b.len() && b[i + 2] == b'\'' {
            i + 3
        } else if c == b'\'' && i + 1 < b.len() && b[i + 1] >= 0x80 {
            // a character of several bytes
            (i + 2..(i + 6).min(b.len()))
                .find(|&j| b[j] == b'\'')
                .map_or(i + 1, |j| j + 1)
        } else {
            out.push(c);
            i += 1;
            continue;
        };
        let end = end.min(b.len());
        blank(&mut out, &b[i..end]);
        i = end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every function with a body in `text`: its name, first line (1-based) and length in lines.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let b = code.as_bytes();
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let mut out = vec![];
    let mut at = 0;
    while let Some(k) = code[at..].find("fn ") {
        let start = at + k;
        at = start + 3;
        if start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            continue;
        }
        let name: String = code[start + 3..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let Some(open) = code[start..].find(['{', ';']).map(|o| start + o) else {
            break;
        };
        if b[open] == b';' || name.is_empty() {
            continue;
        }
        let mut depth = 0i64;
        let mut close = open;
        for (j, &c) in b.iter().enumerate().skip(open) {
            match c {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                close = j;
                break;
            }
        }
        out.push((name, line_of(start), line_of(close) - line_of(start) + 1));
    }
    out
}

/// The longest a function may be, in lines, outside [`LONG_FUNCTIONS`].
const MAX_FUNCTION_LINES: usize = 120;

/// Functions allowed to be longer, each with its reason.
const LONG_FUNCTIONS: &[(&str, &str, &str)] = &[(
    "crates/harma-checkpoint/src/pickle.rs",
    "run",
    "the pickle interpreter's opcode match: one short arm per opcode, read top to bottom",
)];

/// No function is longer than a screenful or two (a long one is several concerns), but those
/// allowed above with their reason; the measure sees through strings and comments.
#[test]
fn no_function_is_longer_than_the_limit() {
    let sample = "fn a() {\n    let s = \"}}\";\n    let c = '{';\n    // }\n}\nfn b(x: &str) -> usize { r#\"}\"#.len() }\n";
    assert_eq!(
        functions(sample),
        [("a".to_string(), 1, 5), ("b".to_string(), 6, 1)]
    );
    let mut long = vec![];
    let mut allowed_seen = vec![];
    for (path, text) in sources() {
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        if !rel.contains("/src/") {
            continue;
        }
        for (name, line, len) in functions(&text) {
            if len <= MAX_FUNCTION_LINES {
                continue;
            }
            if LONG_FUNCTIONS
                .iter()
                .any(|(f, n, _)| *f == rel && *n == name)
            {
                allowed_seen.push(name);
                continue;
            }
            long.push(format!("{rel}:{line} {name}: {len} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (split them, or allow one in \
         LONG_FUNCTIONS with its reason):\n{}",
        long.join("\n")
    );
    // an allowance nobody needs any more is removed
    assert_eq!(allowed_seen.len(), LONG_FUNCTIONS.len(), "{allowed_seen:?}");
}

/// The lines of `text` (up to its unit tests, which may set up their own processes) that read
/// or change the environment, as `line: code`; comments and strings do not count.
fn env_reads(text: &str) -> Vec<String> {
    let code = code_only(text.split("#[cfg(test)]").next().unwrap_or_default());
    code.lines()
        .enumerate()
        .filter(|(_, line)| {
            ["env::var", "env::set_var", "env::remove_var", "env::vars"]
                .iter()
                .any(|p| line.contains(p))
        })
        .map(|(i, line)| format!("{}: {}", i + 1, line.trim()))
        .collect()
}

/// The environment is read at the edge: in the `harma` binary's crate (its start-up and its
/// commands) and in xtask. Libraries take what it says as values (settings, flags), so a
/// library call does the same whatever the process's environment.
#[test]
fn only_the_binary_and_xtask_read_the_environment() {
    // (file, why it may)
    const ALLOWED: &[(&str, &str)] = &[(
        "crates/harma-kernels/src/testing.rs",
        "HARMA_REQUIRE_KERNELS, read by the kernel tests' helpers (no shipped code calls them)",
    )];
    let sample =
        "// env::var in a comment\nfn f() { let s = \"env::var\"; std::env::var(\"X\"); }\n\
                  #[cfg(test)]\nmod tests { fn g() { std::env::set_var(\"Y\", \"1\"); } }\n";
    assert_eq!(
        env_reads(sample),
        ["2: fn f() { let s =           ; std::env::var(   ); }"]
    );
    let mut found = vec![];
    for (path, text) in sources() {
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        let edge = rel.starts_with("crates/harma-train/") || rel.starts_with("xtask/");
        if edge || !rel.contains("/src/") || ALLOWED.iter().any(|(f, _)| *f == rel) {
            continue;
        }
        found.extend(env_reads(&text).into_iter().map(|l| format!("{rel}:{l}")));
    }
    assert!(
        found.is_empty(),
        "a library reads the environment (read it in the binary and pass the value):\n{}",
        found.join("\n")
    );
}

/// Settings are plain serde structs (`harma_settings::settings!`): only the binary maps them
/// to a command line, so no library crate depends on clap.
#[test]
fn only_the_binary_and_xtask_know_clap() {
    let manifests: Vec<(String, PathBuf)> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, dir)| name != "harma-train" && dir.join("Cargo.toml").is_file())
        .collect();
    assert!(manifests.len() >= 14, "{manifests:?}");
    for (name, dir) in manifests {
        let text = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let deps: toml::Table = text.parse().unwrap();
        for section in ["dependencies", "dev-dependencies"] {
            let has = deps
                .get(section)
                .and_then(|d| d.as_table())
                .is_some_and(|d| d.contains_key("clap"));
            assert!(!has, "crates/{name} depends on clap ({section})");
        }
    }
}
