//! The pages: what a run's, an evaluation's and a comparison's page show, as blocks
//! ([`super::page`]) and figures ([`super::plot`]) made from [`Folder`]s.

use std::path::Path;

use anyhow::Result;
use harma_metrics::RetrievalMetrics;

use super::examples::Examples;
use super::info::{RunInfo, Session};
use super::page::{Block, Card, Page, Table};
use super::plot::{self, Level, Mark, Panel, Style, YFormat, PALETTE};
use super::{info, shown, Comparison, EvalRecord, Folder, Ours};
use crate::record::{MetricsLog, StepReport};

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

fn metric_cells(m: &RetrievalMetrics) -> Vec<String> {
    [
        m.txt_r1, m.txt_r5, m.txt_r10, m.img_r1, m.img_r5, m.img_r10, m.r_mean,
    ]
    .iter()
    .map(|&v| f2(v))
    .collect()
}

fn metric_head(first: &str) -> Vec<String> {
    [
        first,
        "i→t R@1",
        "i→t R@5",
        "i→t R@10",
        "t→i R@1",
        "t→i R@5",
        "t→i R@10",
        "mR",
    ]
    .map(String::from)
    .to_vec()
}

pub(super) fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{secs:.1} s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s / 60 % 60),
    }
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Decimals for values of this size.
fn y_format(values: impl Iterator<Item = f64>) -> YFormat {
    let max = values.fold(0.0f64, |a, v| a.max(v.abs()));
    YFormat::Fixed(match max {
        m if m < 1.0 => 3,
        m if m < 100.0 => 2,
        _ => 0,
    })
}

/// A raw series and its smoothed line in one panel.
fn loss_panel(title: &str, pts: Vec<(f64, f64)>, colour: plotters::style::RGBColor) -> Panel {
    let smooth = plot::smooth(&pts, plot::window(pts.len()));
    Panel {
        y_format: y_format(pts.iter().map(|p| p.1)),
        ..Panel::new(title, YFormat::Fixed(2))
    }
    .line(None, pts, colour, Style::Raw)
    .line(None, smooth, colour, Style::Bold)
}

/// The training figure: the three losses, learning rate, temperature, val mR.
fn training_figure(f: &Folder) -> Result<String> {
    let series = |g: &dyn Fn(&StepReport) -> f64| -> Vec<(f64, f64)> {
        f.log
            .iter()
            .map(|l| (l.report.step as f64, g(&l.report)))
            .collect()
    };
    let lr = series(&|r| r.lr);
    let temp = series(&|r| r.temp);
    let mut panels = vec![
        loss_panel("loss (total)", series(&|r| r.loss), PALETTE[0]),
        loss_panel(
            "contrastive loss",
            series(&|r| r.loss_contrastive),
            PALETTE[1],
        ),
        loss_panel("triplet loss", series(&|r| r.loss_triplet), PALETTE[2]),
        Panel::new("learning rate", YFormat::Sci).line(None, lr, PALETTE[3], Style::Bold),
        Panel {
            y_format: YFormat::Fixed(4),
            ..Panel::new("temperature", YFormat::Fixed(4))
        }
        .line(None, temp, PALETTE[4], Style::Bold),
    ];
    panels.push(val_mr_panel(f));
    plot::figure(&panels, 3, 380, 260)
}

/// The val evaluations as (step, metrics), the step-0 evaluation first when there is one.
fn val_points(m: &MetricsLog) -> Vec<(f64, RetrievalMetrics)> {
    let start = m.start.as_ref().and_then(|s| s.val).map(|v| (0.0, v));
    start
        .into_iter()
        .chain(m.val.iter().map(|v| (v.step as f64, v.metrics)))
        .collect()
}

fn val_mr_panel(f: &Folder) -> Panel {
    let m = &f.metrics;
    let pts: Vec<(f64, f64)> = val_points(m).iter().map(|(s, v)| (*s, v.r_mean)).collect();
    let mut p = Panel::new("val mR", YFormat::Fixed(1)).line(None, pts, PALETTE[0], Style::Points);
    p.legend_left = true;
    if let Some(zs) = m.start.as_ref().and_then(|s| s.val) {
        p.levels.push(Level {
            label: "step 0".into(),
            y: zs.r_mean,
            colour: PALETTE[9],
        });
    }
    if let Some(b) = &m.best {
        p.marks.push(Mark {
            at: (b.step as f64, b.metrics.r_mean),
            label: format!("best {:.2}", b.metrics.r_mean),
            colour: PALETTE[2],
            below: true,
        });
    }
    p
}

/// The validation figure: R@1/5/10 both ways per evaluation, the best step marked.
fn validation_figure(f: &Folder) -> Result<String> {
    let m = &f.metrics;
    let side = |title: &str, get: &dyn Fn(&RetrievalMetrics) -> [f64; 3]| {
        let mut p = Panel::new(title, YFormat::Fixed(1));
        p.legend_left = true;
        let points = val_points(m);
        for (k, (name, colour)) in [
            ("R@1", PALETTE[0]),
            ("R@5", PALETTE[1]),
            ("R@10", PALETTE[3]),
        ]
        .into_iter()
        .enumerate()
        {
            let pts = points.iter().map(|(s, v)| (*s, get(v)[k])).collect();
            p = p.line(Some(name), pts, colour, Style::Points);
        }
        if let Some(b) = &m.best {
            p.marks.push(Mark {
                at: (b.step as f64, get(&b.metrics)[0]),
                label: "best mR".into(),
                colour: PALETTE[2],
                below: false,
            });
        }
        p
    };
    let panels = [
        side("val image → text", &|x| [x.txt_r1, x.txt_r5, x.txt_r10]),
        side("val text → image", &|x| [x.img_r1, x.img_r5, x.img_r10]),
    ];
    plot::figure(&panels, 2, 570, 280)
}

/// The results table of a run: zero-shot, best by val, test.
fn results_table(f: &Folder) -> Table {
    let m = &f.metrics;
    let mut t = Table {
        head: metric_head("model, split"),
        numeric: true,
        ..Table::default()
    };
    let start_name = match f.info.as_ref().and_then(|i| i.start_adapters.as_deref()) {
        Some("fresh") | None => "zero-shot",
        Some(_) => "start (step 0)",
    };
    if let Some(s) = &m.start {
        if let Some(v) = &s.val {
            t.rows
                .push([vec![format!("{start_name}, val")], metric_cells(v)].concat());
        }
        if let Some(v) = &s.test {
            t.rows
                .push([vec![format!("{start_name}, test")], metric_cells(v)].concat());
        }
    }
    if let Some(b) = &m.best {
        t.rows.push(
            [
                vec![format!(
                    "best by val, val (step {}, epoch {})",
                    b.step, b.epoch
                )],
                metric_cells(&b.metrics),
            ]
            .concat(),
        );
    }
    if let Some(x) = &m.test {
        t.strong.push(t.rows.len());
        let which = if x.adapters == "best.safetensors" {
            "best-by-val adapters"
        } else {
            "last adapters"
        };
        t.rows.push(
            [
                vec![format!("test ({which}, step {})", x.step)],
                metric_cells(&x.metrics),
            ]
            .concat(),
        );
    }
    t
}

/// The training summary: numbers read straight from log.jsonl.
fn training_table(f: &Folder) -> Table {
    let mut rows = Vec::new();
    let total = f.total_steps();
    if let (Some(first), Some(last)) = (f.log.first(), f.log.last()) {
        let (a, b) = (&first.report, &last.report);
        rows.push(vec![
            "steps".to_string(),
            match total {
                Some(t) => format!("{} of {t}", b.step),
                None => b.step.to_string(),
            },
        ]);
        rows.push(vec!["epochs".into(), last.epoch.to_string()]);
        rows.push(vec![
            format!("loss at step {}", a.step),
            format!("{:.4}", a.loss),
        ]);
        rows.push(vec![
            format!("loss at step {}", b.step),
            format!("{:.4}", b.loss),
        ]);
        let low = f
            .log
            .iter()
            .min_by(|x, y| x.report.loss.total_cmp(&y.report.loss))
            .expect("not empty");
        rows.push(vec![
            format!("lowest loss (step {})", low.report.step),
            format!("{:.4}", low.report.loss),
        ]);
        let peak = f.log.iter().map(|l| l.report.lr).fold(0.0, f64::max);
        rows.push(vec!["peak learning rate".into(), format!("{peak:.3e}")]);
        rows.push(vec![
            format!("temperature at step {}", b.step),
            format!("{:.5}", b.temp),
        ]);
    }
    Table {
        head: vec!["training".into(), "".into()],
        rows,
        numeric: true,
        ..Table::default()
    }
}

fn val_table(f: &Folder) -> Table {
    let m = &f.metrics;
    let mut t = Table {
        head: [
            vec!["step (epoch)".to_string()],
            metric_head("")[1..].to_vec(),
        ]
        .concat(),
        numeric: true,
        ..Table::default()
    };
    for v in &m.val {
        if m.best.as_ref().is_some_and(|b| b.step == v.step) {
            t.strong.push(t.rows.len());
        }
        t.rows.push(
            [
                vec![format!("{} ({})", v.step, v.epoch)],
                metric_cells(&v.metrics),
            ]
            .concat(),
        );
    }
    t
}

fn examples_blocks(ex: &Examples) -> Vec<Block> {
    vec![
        Block::Heading(format!("Retrieval examples: {}", ex.title)),
        Block::Para(format!(
            "{} images, {} captions. A seeded sample of queries (the same in every report of \
             this run), then the worst failures (the correct item ranked lowest). Green: a \
             correct result; the number under each image is its rank, then its score.",
            ex.images, ex.captions
        )),
        Block::Subheading("text → image: top 5 images per caption".into()),
        Block::TextQueries(ex.text_to_image.clone()),
        Block::Subheading("image → text: top 5 captions per image".into()),
        Block::ImageQueries(ex.image_to_text.clone()),
        Block::Subheading("worst failures, text → image".into()),
        Block::TextQueries(ex.worst_text_to_image.clone()),
        Block::Subheading("worst failures, image → text".into()),
        Block::ImageQueries(ex.worst_image_to_text.clone()),
    ]
}

fn comparison_blocks(f: &Folder, c: &Comparison) -> Vec<Block> {
    let m = &f.metrics;
    let ours = |o: Ours| match o {
        Ours::Test => m.test.as_ref().map(|t| t.metrics),
        Ours::ZeroShot => m.start.as_ref().and_then(|s| s.test),
    };
    let mut t = Table {
        head: [
            "published result",
            "source",
            "mR",
            "i→t R@1",
            "t→i R@1",
            "this run",
            "mR",
            "gap (mR)",
        ]
        .map(String::from)
        .to_vec(),
        numeric: false,
        ..Table::default()
    };
    let opt = |v: Option<f64>| v.map_or("-".to_string(), f2);
    for p in &c.published {
        let mine = p.ours.and_then(|o| ours(o).map(|x| (o, x)));
        let (which, mr, gap) = match (p.ours, mine) {
            (Some(o), Some((_, x))) => (
                match o {
                    Ours::Test => "test, trained",
                    Ours::ZeroShot => "test, zero-shot",
                }
                .to_string(),
                f2(x.r_mean),
                format!("{:+.2}", x.r_mean - p.r_mean),
            ),
            (Some(_), None) => ("not yet".into(), "-".into(), "-".into()),
            (None, _) => ("(context)".into(), "".into(), "".into()),
        };
        t.rows.push(vec![
            p.setting.clone(),
            p.source.clone(),
            f2(p.r_mean),
            opt(p.txt_r1),
            opt(p.img_r1),
            which,
            mr,
            gap,
        ]);
    }
    let mut blocks = vec![Block::Heading(format!(
        "Against the published numbers: {}",
        c.title
    ))];
    if !c.notes.is_empty() {
        blocks.push(Block::Bullets(c.notes.clone()));
    }
    blocks.push(Block::Table(t));
    blocks.push(Block::Para(
        "Gap: this run's mR minus the published one, in points. Published numbers are quoted \
         as their sources print them; none was measured here."
            .into(),
    ));
    if !c.recipe.is_empty() {
        blocks.push(Block::Fold(
            "The recipe".into(),
            vec![
                Block::Table(Table {
                    head: vec!["setting".into(), "value".into(), "why".into()],
                    rows: c
                        .recipe
                        .iter()
                        .map(|(k, v, w)| vec![format!("`{k}`"), v.clone(), w.clone()])
                        .collect(),
                    ..Table::default()
                }),
                Block::Para(format!("Rerun or continue it: `{}`", c.command)),
            ],
        ));
    }
    blocks
}

/// Settings, data, checkpoints, machine and time.
fn details_blocks(f: &Folder) -> Vec<Block> {
    let mut blocks: Vec<Block> = settings_block(f).into_iter().collect();
    let files = files_table(f);
    if !files.rows.is_empty() {
        blocks.push(Block::Subheading("Data and checkpoints".into()));
        blocks.push(Block::Table(files));
    }
    if let Some(info) = &f.info {
        blocks.push(Block::Subheading("Machine and time".into()));
        blocks.push(Block::Table(phases_table(info)));
        blocks.push(Block::Bullets(speed_and_memory(info)));
        blocks.push(Block::Table(sessions_table(info)));
    }
    blocks
}

/// The run's settings as config.toml holds them, folded.
fn settings_block(f: &Folder) -> Option<Block> {
    let rows = f
        .config
        .as_ref()?
        .iter()
        .map(|(k, v)| {
            let shown = match v {
                toml::Value::String(s) if s.starts_with('/') => f.shown(Path::new(s)),
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            vec![format!("`{k}`"), shown]
        })
        .collect();
    Some(Block::Fold(
        "Settings (config.toml)".into(),
        vec![Block::Table(Table {
            head: vec!["setting".into(), "value".into()],
            rows,
            ..Table::default()
        })],
    ))
}

/// A row of the files table: the file (as a code span, or as given), its role, its counts
/// and its checksum.
fn file_row(
    file: String,
    role: String,
    counts: Option<(usize, usize)>,
    sha256: &str,
) -> Vec<String> {
    let (images, captions) = counts.map_or((String::new(), String::new()), |(i, c)| {
        (i.to_string(), c.to_string())
    });
    let sha = if sha256.is_empty() {
        String::new()
    } else {
        format!("`{sha256}`")
    };
    vec![file, role, images, captions, sha]
}

/// The annotation files, the backbone, the starting adapters and the checkpoints, hashed.
fn files_table(f: &Folder) -> Table {
    let mut rows = Vec::new();
    if let Some(info) = &f.info {
        for d in &info.data {
            rows.push(file_row(
                format!("`{}`", f.shown(&d.file.path)),
                format!("{} annotations", d.split),
                Some((d.images, d.captions)),
                &d.file.sha256,
            ));
        }
        if let Some(init) = &info.init {
            rows.push(file_row(
                format!("`{}`", f.shown(&init.path)),
                format!("backbone ({})", gigabytes(init.bytes)),
                None,
                &init.sha256,
            ));
        }
        if let Some(a) = &info.start_adapters {
            let file = if a == "fresh" {
                "(fresh)".to_string()
            } else {
                format!("`{}`", f.shown(Path::new(a)))
            };
            rows.push(file_row(file, "starting adapters".into(), None, ""));
        }
    }
    for c in &f.checkpoints {
        let name = c
            .path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let meta = checkpoint_step(&c.path).map_or(String::new(), |s| format!(", step {s}"));
        let role = format!("checkpoint ({:.1} MB{meta})", c.bytes as f64 / 1e6);
        rows.push(file_row(format!("`{name}`"), role, None, &c.sha256));
    }
    Table {
        head: ["file", "role", "images", "captions", "sha256"]
            .map(String::from)
            .to_vec(),
        rows,
        ..Table::default()
    }
}

/// Wall time per phase, with each one's share and the total.
fn phases_table(info: &RunInfo) -> Table {
    let phases = info.phases();
    let total = phases.total();
    let mut rows: Vec<Vec<String>> = phases
        .named()
        .iter()
        .filter(|(_, s)| *s > 0.0)
        .map(|(n, s)| {
            vec![
                n.to_string(),
                duration(*s),
                format!("{:.0}%", 100.0 * s / total.max(1e-9)),
            ]
        })
        .collect();
    rows.push(vec!["total".into(), duration(total), "100%".into()]);
    Table {
        head: vec!["phase".into(), "wall time".into(), "share".into()],
        strong: vec![rows.len() - 1],
        rows,
        numeric: true,
    }
}

/// Training throughput and peak memory, where recorded.
fn speed_and_memory(info: &RunInfo) -> Vec<String> {
    let mut facts = Vec::new();
    if let Some(p) = info.pairs_per_second() {
        facts.push(format!(
            "Training throughput: {p:.1} pairs/s (pairs trained over training-step time)."
        ));
    }
    if let Some(m) = info.peak_memory() {
        facts.push(format!("Peak memory (VmHWM): {}.", gigabytes(m)));
    }
    facts
}

/// A column of the sessions table: its heading, and the cell of a session.
type SessionColumn = (&'static str, fn(&Session) -> String);

/// The columns of the sessions table.
const SESSION_COLUMNS: &[SessionColumn] = &[
    ("session (UTC)", |s| s.started.clone()),
    ("harma-rs (commit)", |s| {
        format!("{} ({})", s.version, s.commit)
    }),
    ("CPU", |s| s.cpu.clone()),
    ("threads / cores", |s| {
        format!("{} / {}", s.threads, s.cores)
    }),
    ("device", |s| s.device.clone()),
    ("precision", |s| s.precision.clone()),
    ("steps", |s| format!("{}-{}", s.from_step, s.to_step)),
    ("peak memory", |s| {
        s.peak_memory.map_or("-".into(), gigabytes)
    }),
];

/// One row per session of the run (a resumed run has several).
fn sessions_table(info: &RunInfo) -> Table {
    Table {
        head: SESSION_COLUMNS.iter().map(|(h, _)| h.to_string()).collect(),
        rows: info
            .sessions
            .iter()
            .map(|s| SESSION_COLUMNS.iter().map(|(_, cell)| cell(s)).collect())
            .collect(),
        ..Table::default()
    }
}

/// The step a run's checkpoint was written after (its metadata).
fn checkpoint_step(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut n).ok()?;
    let len = u64::from_le_bytes(n);
    if len > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    std::io::Read::read_exact(&mut f, &mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(v["__metadata__"]["step"].as_str()?.to_string())
}

fn footer() -> String {
    let (v, c) = info::version();
    format!(
        "Made by harma-rs {v} (commit {c}) at {} UTC. Rebuild with `harma report DIR`.",
        info::utc_now()
    )
}

/// The page of a training run.
pub(super) fn run_page(f: &Folder) -> Result<Page> {
    let mut blocks = vec![Block::Cards(run_cards(f))];
    if let Some(c) = &f.comparison {
        blocks.extend(comparison_blocks(f, c));
    }
    blocks.extend(results_blocks(f));
    blocks.extend(training_blocks(f)?);
    blocks.extend(validation_blocks(f)?);
    let page = Page {
        title: format!("HarMA run: {}", f.title()),
        subtitle: run_subtitle(f),
        blocks,
        footer: footer(),
        ..Page::default()
    };
    Ok(examples_and_details(page, f, "Run details"))
}

/// What was trained from what, and how far the run is.
fn run_subtitle(f: &Folder) -> String {
    let m = &f.metrics;
    let done = f.log.last().map_or(0, |l| l.report.step);
    let status = match (&m.test, f.total_steps()) {
        (Some(_), _) => "finished".to_string(),
        (None, Some(t)) if done >= t => "trained; test not evaluated".to_string(),
        (None, Some(t)) => format!("in progress: step {done} of {t}"),
        (None, None) => format!("in progress: step {done}"),
    };
    let init = f
        .setting("init")
        .and_then(|v| v.as_str())
        .map(|s| {
            Path::new(s)
                .file_name()
                .map_or(s.to_string(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let train = f
        .setting("train_json")
        .and_then(|v| v.as_str())
        .map(|s| f.shown(Path::new(s)))
        .unwrap_or_default();
    format!("{train} from {init}; {status}")
}

/// The cards at the top of a run's page: test mR, its change from step 0, best val mR, wall
/// time and memory.
fn run_cards(f: &Folder) -> Vec<Card> {
    let m = &f.metrics;
    let mut cards = Vec::new();
    let zs = m.start.as_ref().and_then(|s| s.test);
    cards.push(Card {
        label: "test mR".into(),
        value: m.test.as_ref().map_or("-".into(), |t| f2(t.metrics.r_mean)),
        note: m.test.as_ref().map_or("after training".into(), |t| {
            format!("{}, step {}", t.adapters, t.step)
        }),
    });
    if let Some(z) = zs {
        cards.push(Card {
            label: "step-0 test mR".into(),
            value: f2(z.r_mean),
            note: "before training".into(),
        });
        if let Some(t) = &m.test {
            cards.push(Card {
                label: "change".into(),
                value: format!("{:+.2}", t.metrics.r_mean - z.r_mean),
                note: "points of test mR".into(),
            });
        }
    }
    if let Some(b) = &m.best {
        cards.push(Card {
            label: "best val mR".into(),
            value: f2(b.metrics.r_mean),
            note: format!("step {} (epoch {})", b.step, b.epoch),
        });
    }
    if let Some(info) = &f.info {
        cards.push(Card {
            label: "wall time".into(),
            value: duration(info.phases().total()),
            note: info
                .pairs_per_second()
                .map_or(String::new(), |p| format!("{p:.1} pairs/s training")),
        });
        if let Some(mem) = info.peak_memory() {
            cards.push(Card {
                label: "peak memory".into(),
                value: gigabytes(mem),
                note: "resident (VmHWM)".into(),
            });
        }
    }
    cards
}

/// The results table and how to read it.
fn results_blocks(f: &Folder) -> Vec<Block> {
    vec![
        Block::Heading("Results".into()),
        Block::Table(results_table(f)),
        Block::Para(
            "R@K in percent: image → text counts an image as found when any of its captions \
             is among the top K; text → image, when the caption's image is. mR is the mean of \
             the six. Test is evaluated once, with the adapters chosen on val."
                .into(),
        ),
    ]
}

/// The training curves and their table.
fn training_blocks(f: &Folder) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    blocks.push(Block::Heading("Training".into()));
    if f.log.is_empty() {
        blocks.push(Block::Para("No step recorded yet.".into()));
    } else {
        blocks.push(Block::Figure {
            file: "training.svg".into(),
            svg: training_figure(f)?,
            caption: format!(
                "Per step: thin lines as logged, bold lines {}. \
                 Val mR per evaluation; the dashed line is the model at step 0.",
                match plot::window(f.log.len()) {
                    1 => "as logged too (too few steps to smooth)".to_string(),
                    w => format!("a centred moving average over {w} steps"),
                }
            ),
        });
        blocks.push(Block::Table(training_table(f)));
    }
    Ok(blocks)
}

/// The val curves and every val evaluation, if any.
fn validation_blocks(f: &Folder) -> Result<Vec<Block>> {
    let m = &f.metrics;
    let mut blocks = Vec::new();
    if !m.val.is_empty() {
        blocks.push(Block::Heading("Validation".into()));
        blocks.push(Block::Figure {
            file: "validation.svg".into(),
            svg: validation_figure(f)?,
            caption: "Recall at 1, 5 and 10 on val at each evaluation (step 0: before \
                      training); the circled point is the best mR, whose adapters are kept as \
                      best.safetensors."
                .into(),
        });
        blocks.push(Block::Fold(
            format!("Every val evaluation ({})", m.val.len()),
            vec![Block::Table(val_table(f))],
        ));
    }
    Ok(blocks)
}

/// The page of an evaluation (`harma eval --report`).
pub(super) fn eval_page(f: &Folder, e: &EvalRecord) -> Page {
    let adapters = e
        .adapters
        .as_ref()
        .map_or("no adapters (zero-shot)".to_string(), |a| {
            format!("adapters {}", f.shown(a))
        });
    let mut blocks = vec![Block::Cards(vec![
        Card {
            label: "mR".into(),
            value: f2(e.test.r_mean),
            note: format!("{} images, {} captions", e.images, e.captions),
        },
        Card {
            label: "image → text R@1".into(),
            value: f2(e.test.txt_r1),
            note: String::new(),
        },
        Card {
            label: "text → image R@1".into(),
            value: f2(e.test.img_r1),
            note: String::new(),
        },
        Card {
            label: "wall time".into(),
            value: duration(e.seconds.images + e.seconds.captions + e.seconds.metrics),
            note: "embedding and scoring".into(),
        },
    ])];
    blocks.push(Block::Heading("Results".into()));
    blocks.push(Block::Table(Table {
        head: metric_head("split"),
        rows: vec![[vec![f.shown(&e.test_json)], metric_cells(&e.test)].concat()],
        strong: vec![0],
        numeric: true,
    }));
    blocks.push(Block::Table(Table {
        head: vec!["part".into(), "seconds".into()],
        rows: vec![
            vec![
                "images (decode and embed, overlapped)".into(),
                format!("{:.2}", e.seconds.images),
            ],
            vec![
                "  decoding (busy)".into(),
                format!("{:.2}", e.seconds.decode),
            ],
            vec![
                "  image tower (busy)".into(),
                format!("{:.2}", e.seconds.embed_images),
            ],
            vec!["captions".into(), format!("{:.2}", e.seconds.captions)],
            vec![
                "scores and metrics".into(),
                format!("{:.3}", e.seconds.metrics),
            ],
        ],
        numeric: true,
        ..Table::default()
    }));
    let page = Page {
        title: format!("HarMA evaluation: {}", f.title()),
        subtitle: format!(
            "{} with {}, {adapters}",
            f.shown(&e.test_json),
            f.shown(&e.model)
        ),
        blocks,
        footer: footer(),
        ..Page::default()
    };
    examples_and_details(page, f, "Details")
}

/// A page's last sections: the retrieval examples (with their thumbnails) when the folder has
/// them, then the folder's details under `heading`.
fn examples_and_details(mut page: Page, f: &Folder, heading: &str) -> Page {
    if let Some(ex) = &f.examples {
        page.blocks.extend(examples_blocks(ex));
        page.thumbnails = ex.thumbnails.clone();
    }
    page.blocks.push(Block::Heading(heading.into()));
    page.blocks.extend(details_blocks(f));
    page
}

/// Distinct names for the runs (their folder names, numbered when they repeat).
fn run_names(folders: &[Folder]) -> Vec<String> {
    folders
        .iter()
        .enumerate()
        .map(|(i, f)| {
            if folders.iter().filter(|g| g.name == f.name).count() > 1 {
                format!("{} ({})", f.name, i + 1)
            } else {
                f.name.clone()
            }
        })
        .collect()
}

/// The runs' curves overlaid, each in its colour: the smoothed loss, val mR, the learning rate
/// and the temperature, as one SVG.
fn compare_curves(folders: &[Folder], names: &[String]) -> Result<String> {
    let colour = |i: usize| PALETTE[i % PALETTE.len()];
    let mut loss = Panel::new("loss (smoothed)", YFormat::Fixed(2));
    let mut mr = Panel::new("val mR", YFormat::Fixed(1));
    mr.legend_left = true;
    let mut lr = Panel::new("learning rate", YFormat::Sci);
    let mut temp = Panel::new("temperature", YFormat::Fixed(4));
    for (i, f) in folders.iter().enumerate() {
        let pts: Vec<(f64, f64)> = f
            .log
            .iter()
            .map(|l| (l.report.step as f64, l.report.loss))
            .collect();
        let name = Some(names[i].as_str());
        loss = loss.line(
            name,
            plot::smooth(&pts, plot::window(pts.len())),
            colour(i),
            Style::Bold,
        );
        let val = val_points(&f.metrics)
            .iter()
            .map(|(s, v)| (*s, v.r_mean))
            .collect();
        mr = mr.line(name, val, colour(i), Style::Points);
        let series = |g: fn(&StepReport) -> f64| {
            f.log
                .iter()
                .map(|l| (l.report.step as f64, g(&l.report)))
                .collect::<Vec<_>>()
        };
        lr = lr.line(name, series(|r| r.lr), colour(i), Style::Bold);
        temp = temp.line(name, series(|r| r.temp), colour(i), Style::Bold);
    }
    loss.y_format = y_format(loss.lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    plot::figure(&[loss, mr, lr, temp], 2, 570, 280)
}

/// The runs' results in columns under `head`: test R@K and mR, zero-shot and best val mR,
/// steps, time, speed and memory.
fn compare_results(folders: &[Folder], head: &[String]) -> Table {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |label: &str, cell: &dyn Fn(&Folder) -> String| {
        let mut r = vec![label.to_string()];
        r.extend(folders.iter().map(cell));
        rows.push(r);
    };
    let test = |f: &Folder| f.metrics.test.as_ref().map(|t| t.metrics);
    for (label, get) in [
        (
            "test i→t R@1",
            (|m: &RetrievalMetrics| m.txt_r1) as fn(&RetrievalMetrics) -> f64,
        ),
        ("test i→t R@5", |m| m.txt_r5),
        ("test i→t R@10", |m| m.txt_r10),
        ("test t→i R@1", |m| m.img_r1),
        ("test t→i R@5", |m| m.img_r5),
        ("test t→i R@10", |m| m.img_r10),
        ("test mR", |m| m.r_mean),
    ] {
        row(label, &|f| test(f).map_or("-".into(), |m| f2(get(&m))));
    }
    row("step-0 test mR", &|f| {
        f.metrics
            .start
            .as_ref()
            .and_then(|s| s.test)
            .map_or("-".into(), |m| f2(m.r_mean))
    });
    row("best val mR (step)", &|f| {
        f.metrics.best.as_ref().map_or("-".into(), |b| {
            format!("{} ({})", f2(b.metrics.r_mean), b.step)
        })
    });
    row("steps", &|f| {
        f.log
            .last()
            .map_or("0".into(), |l| l.report.step.to_string())
    });
    row("wall time", &|f| {
        f.info
            .as_ref()
            .map_or("-".into(), |i| duration(i.phases().total()))
    });
    row("pairs/s (training)", &|f| {
        f.info
            .as_ref()
            .and_then(|i| i.pairs_per_second())
            .map_or("-".into(), |p| format!("{p:.1}"))
    });
    row("peak memory", &|f| {
        f.info
            .as_ref()
            .and_then(|i| i.peak_memory())
            .map_or("-".into(), gigabytes)
    });
    Table {
        head: head.to_vec(),
        strong: vec![6],
        rows,
        numeric: true,
    }
}

/// The settings whose values differ between the runs, and the data files that do (by
/// sha256): a row each, the setting then each run's value. Paths are shown relative to `out`.
fn differing_settings(folders: &[Folder], out: &Path) -> Vec<Vec<String>> {
    let mut keys: Vec<&String> = folders
        .iter()
        .filter_map(|f| f.config.as_ref())
        .flat_map(|c| c.keys())
        .collect();
    keys.sort();
    keys.dedup();
    let value = |f: &Folder, k: &str| -> String {
        match f.setting(k) {
            None => "-".into(),
            Some(toml::Value::String(s)) if s.starts_with('/') => shown(Path::new(s), out),
            Some(toml::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }
    };
    let mut differ = Vec::new();
    for k in keys {
        if k == "out" {
            continue;
        }
        let vals: Vec<String> = folders.iter().map(|f| value(f, k)).collect();
        if vals.iter().any(|v| v != &vals[0]) {
            differ.push([vec![format!("`{k}`")], vals].concat());
        }
    }
    for split in ["train", "val", "test"] {
        let vals: Vec<String> = folders
            .iter()
            .map(|f| {
                f.info
                    .as_ref()
                    .and_then(|i| i.data.iter().find(|d| d.split == split))
                    .map_or("-".into(), |d| {
                        d.file.sha256[..12.min(d.file.sha256.len())].to_string()
                    })
            })
            .collect();
        if vals.iter().any(|v| v != &vals[0]) {
            differ.push([vec![format!("{split} data (sha256)")], vals].concat());
        }
    }
    differ
}

/// One page comparing the runs in `dirs`: curves overlaid, results and differing settings
/// side by side. Paths are shown relative to `out`.
pub(super) fn compare_page(folders: &[Folder], out: &Path) -> Result<Page> {
    let names = run_names(folders);
    let svg = compare_curves(folders, &names)?;
    let mut head = vec![String::new()];
    head.extend(names.iter().cloned());
    let results = compare_results(folders, &head);
    let differ = differing_settings(folders, out);
    let mut blocks = vec![
        Block::Bullets(
            folders
                .iter()
                .zip(&names)
                .map(|(f, n)| format!("{n}: `{}`", shown(&f.dir, out)))
                .collect(),
        ),
        Block::Heading("Curves".into()),
        Block::Figure {
            file: "compare.svg".into(),
            svg,
            caption: "Each run in its colour: the loss smoothed over about 1/25 of its steps, \
                      val mR per evaluation, the learning rate and the temperature."
                .into(),
        },
        Block::Heading("Results side by side".into()),
        Block::Table(results),
        Block::Heading("Settings that differ".into()),
    ];
    if differ.is_empty() {
        blocks.push(Block::Para(
            "None: the runs have the same settings and data (they differ in nothing but, \
             perhaps, the machine)."
                .into(),
        ));
    } else {
        blocks.push(Block::Table(Table {
            head,
            rows: differ,
            ..Table::default()
        }));
    }
    let page = Page {
        title: format!("HarMA runs compared: {}", names.join(" vs ")),
        subtitle: format!("{} runs", folders.len()),
        blocks,
        footer: footer(),
        ..Page::default()
    };
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(3.25), "3.2 s");
        assert_eq!(duration(125.0), "2m 05s");
        assert_eq!(duration(3.0 * 3600.0 + 61.0), "3h 01m");
    }
}
