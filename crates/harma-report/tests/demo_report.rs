//! The committed demo report (docs/demo-report) is what the current code makes from the
//! records committed beside it: a change to the pages, their style or their plots that was not
//! regenerated (`scripts/demo-report.sh`) fails here, so the report README shows cannot drift.

use std::path::{Path, PathBuf};

/// The pages, with the footer's build and date (the one part a rebuild changes) left out.
fn page(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let Some(start) = text.find("Made by harma-rs ") else {
        return text;
    };
    let end = text[start..]
        .find(" UTC.")
        .map_or(text.len(), |e| start + e + 5);
    format!("{}Made by harma-rs (build){}", &text[..start], &text[end..])
}

#[test]
fn the_committed_demo_report_is_current() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/demo-report");
    // the same last two path components: the page's title is made from them
    let root = std::env::temp_dir().join(format!("harma-demo-report-{}", std::process::id()));
    let rebuilt: PathBuf = root.join("docs/demo-report");
    std::fs::remove_dir_all(&root).ok();
    std::fs::create_dir_all(&rebuilt).unwrap();
    for record in [
        "config.toml",
        "log.jsonl",
        "metrics.json",
        "run.json",
        "examples.json",
    ] {
        std::fs::copy(committed.join(record), rebuilt.join(record))
            .unwrap_or_else(|e| panic!("docs/demo-report/{record}: {e}"));
    }
    harma_report::write_report(&rebuilt).unwrap();
    for file in ["report.html", "report.md", "training.svg", "validation.svg"] {
        let (want, got) = (page(&committed.join(file)), page(&rebuilt.join(file)));
        if want != got {
            let line = want
                .lines()
                .zip(got.lines())
                .position(|(a, b)| a != b)
                .map_or(want.lines().count().min(got.lines().count()), |i| i)
                + 1;
            panic!(
                "docs/demo-report/{file} is not what the code makes from its records (first \
                 difference at line {line}): regenerate it with scripts/demo-report.sh"
            );
        }
    }
    std::fs::remove_dir_all(&root).ok();
}
