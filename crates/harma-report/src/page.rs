//! A report page as a list of blocks, written out twice: as one self-contained HTML file
//! (inline SVG figures, thumbnails as data URIs, its own CSS; no external reference of any
//! kind) and as Markdown (figures as links to the SVG files written beside it).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::examples::{ImageQuery, TextQuery};

/// A headline number.
#[derive(Debug, Clone)]
pub struct Card {
    pub label: String,
    pub value: String,
    pub note: String,
}

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub head: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// rows drawn emphasised (the best val point, the final test)
    pub strong: Vec<usize>,
    /// Columns after the first hold numbers (right-aligned).
    pub numeric: bool,
}

#[derive(Debug, Clone)]
pub enum Block {
    Heading(String),
    Subheading(String),
    Para(String),
    Bullets(Vec<String>),
    Cards(Vec<Card>),
    Table(Table),
    /// an SVG figure: inline in HTML, `file` (written beside the page) in Markdown
    Figure {
        file: String,
        svg: String,
        caption: String,
    },
    TextQueries(Vec<TextQuery>),
    ImageQueries(Vec<ImageQuery>),
    /// folded in HTML (`<details>`), a plain section in Markdown
    Fold(String, Vec<Block>),
}

/// A whole page.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub title: String,
    pub subtitle: String,
    pub blocks: Vec<Block>,
    /// image path -> data URI
    pub thumbnails: BTreeMap<String, String>,
    pub footer: String,
}

pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text for a Markdown table cell or line: no pipes, no line breaks, no HTML. Inside a code
/// span (between backticks) `<` is already literal, and an entity would be shown as written,
/// so it is escaped only outside them.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_code = false;
    for c in s.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '|' => out.push_str("\\|"),
            '\n' | '\r' => out.push(' '),
            '<' if !in_code => out.push_str("&lt;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a Markdown code span (a name: an image file, a path): shown exactly, pipes escaped
/// for tables, line breaks as spaces; fenced with two backticks where it holds one.
fn md_code(s: &str) -> String {
    let inner = s.replace('|', "\\|").replace(['\n', '\r'], " ");
    if inner.contains('`') {
        format!("`` {inner} ``")
    } else {
        format!("`{inner}`")
    }
}

const CSS: &str = r#"
:root{--ink:#26262b;--soft:#6b6b76;--line:#e4e4ea;--bg:#f6f6f9;--card:#fff;--accent:#4e79a7;--good:#2e8b57;--bad:#c0392b}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1160px;margin:0 auto;padding:28px 28px 60px}
header h1{font-size:26px;margin:0 0 4px;letter-spacing:-.01em}
header p{margin:0;color:var(--soft)}
h2{font-size:19px;margin:36px 0 12px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:22px 0 8px;color:var(--soft);text-transform:uppercase;letter-spacing:.04em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin:22px 0 8px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .l{font-size:12px;color:var(--soft);text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:26px;font-weight:650;margin:2px 0;font-variant-numeric:tabular-nums}
.card .n{font-size:12px;color:var(--soft)}
table{display:block;max-width:100%;overflow-x:auto;border-collapse:collapse;background:var(--card);border:1px solid var(--line);border-radius:8px;margin:8px 0 14px;font-size:13.5px}
th,td{padding:6px 11px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#fafafc;font-weight:600;color:var(--soft);font-size:12.5px}
table.num td:not(:first-child),table.num th:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
tr.strong td{font-weight:650;background:#f1f6fb}
td code,p code,li code{font-size:12px;background:#f0f0f4;padding:1px 4px;border-radius:4px;word-break:break-all}
figure{margin:10px 0 18px;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:8px}
figure svg{display:block;width:100%;height:auto}
figcaption{font-size:13px;color:var(--soft);padding:4px 6px 0}
.q{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 12px;margin:10px 0}
.q .cap{margin:0 0 8px}
.q .meta{font-size:12.5px;color:var(--soft)}
.row{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start}
.hit{width:104px;font-size:11.5px;color:var(--soft);text-align:center}
.t{background-color:#ddd;background-position:center;background-size:cover;background-repeat:no-repeat}
.hit .t{width:100px;height:100px;border-radius:6px;border:3px solid transparent;margin:0 auto 2px}
.hit.ok .t{border-color:var(--good)}
.qi{display:flex;gap:14px;align-items:flex-start}
.qi .t{width:112px;height:112px;flex:none;border-radius:6px}
.qi ol{margin:0;padding-left:22px;font-size:13.5px}
.qi li.ok{color:var(--good);font-weight:600}
.tick{color:var(--good);font-weight:700}
.cross{color:var(--bad);font-weight:700}
details{margin:8px 0}
summary{cursor:pointer;color:var(--accent);font-weight:600}
ul.notes{padding-left:20px}
footer{margin-top:40px;color:var(--soft);font-size:12.5px}
@media (max-width:600px){main{padding:18px 12px 40px}.qi{flex-direction:column}}
"#;

/// Strip what an inline SVG does not need in HTML (the XML namespace declaration).
fn inline_svg(svg: &str) -> String {
    svg.replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")
}

/// A thumbnail's CSS class name.
fn thumb_class(index: usize) -> String {
    format!("i{index}")
}

impl Page {
    pub fn html(&self) -> String {
        // each thumbnail is embedded once, as a CSS class, however often it appears
        let classes: BTreeMap<&str, String> = self
            .thumbnails
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_str(), thumb_class(i)))
            .collect();
        let mut css = String::from(CSS);
        for (i, uri) in self.thumbnails.values().enumerate() {
            let _ = writeln!(css, ".{}{{background-image:url({uri})}}", thumb_class(i));
        }
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
             <title>{}</title><style>{css}</style></head><body><main>\n<header><h1>{}</h1><p>{}</p></header>\n",
            esc(&self.title),
            esc(&self.title),
            esc(&self.subtitle)
        );
        for b in &self.blocks {
            html_block(&mut h, b, &classes);
        }
        let _ = write!(
            h,
            "<footer>{}</footer>\n</main></body></html>\n",
            inline_html(&self.footer)
        );
        h
    }

    pub fn markdown(&self) -> String {
        let mut m = format!("# {}\n\n{}\n\n", md(&self.title), md(&self.subtitle));
        for b in &self.blocks {
            md_block(&mut m, b, 2);
        }
        let _ = writeln!(m, "---\n{}", md(&self.footer));
        m
    }

    /// The figures (file name, SVG) the Markdown links to.
    pub fn figures(&self) -> Vec<(String, String)> {
        fn walk(blocks: &[Block], out: &mut Vec<(String, String)>) {
            for b in blocks {
                match b {
                    Block::Figure { file, svg, .. } => out.push((file.clone(), svg.clone())),
                    Block::Fold(_, inner) => walk(inner, out),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.blocks, &mut out);
        out
    }
}

/// A thumbnail box: the image as its class's background, or grey when there is none.
fn thumb(classes: &BTreeMap<&str, String>, image: &str) -> String {
    match classes.get(image) {
        Some(c) => format!("<div class=\"t {c}\" title=\"{}\"></div>", esc(image)),
        None => format!(
            "<div class=\"t\" title=\"{} (no thumbnail)\"></div>",
            esc(image)
        ),
    }
}

fn html_table(h: &mut String, t: &Table) {
    let _ = write!(
        h,
        "<table{}>",
        if t.numeric { " class=\"num\"" } else { "" }
    );
    if !t.head.is_empty() {
        h.push_str("<thead><tr>");
        for c in &t.head {
            let _ = write!(h, "<th>{}</th>", esc(c));
        }
        h.push_str("</tr></thead>");
    }
    h.push_str("<tbody>");
    for (i, r) in t.rows.iter().enumerate() {
        let _ = write!(
            h,
            "<tr{}>",
            if t.strong.contains(&i) {
                " class=\"strong\""
            } else {
                ""
            }
        );
        for c in r {
            let _ = write!(h, "<td>{}</td>", inline_html(c));
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>\n");
}

/// Cell and paragraph text: escaped, with `code` spans kept.
fn inline_html(s: &str) -> String {
    let parts: Vec<&str> = s.split('`').collect();
    if parts.len() < 3 || parts.len().is_multiple_of(2) {
        return esc(s);
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 1 {
                format!("<code>{}</code>", esc(p))
            } else {
                esc(p)
            }
        })
        .collect()
}

/// Retrieval examples by caption: each caption, its top images (the right ones ticked) and,
/// when it ranks lower, its own image.
fn html_text_queries(h: &mut String, qs: &[TextQuery], classes: &BTreeMap<&str, String>) {
    for q in qs {
        let _ = write!(
            h,
            "<div class=\"q\"><p class=\"cap\">&ldquo;{}&rdquo; <span class=\"meta\">its image {} ranks {}</span></p><div class=\"row\">",
            esc(&q.caption),
            esc(&q.image),
            q.rank
        );
        for (k, hit) in q.top.iter().enumerate() {
            let _ = write!(
                h,
                "<div class=\"hit{}\">{}{}{} {:.3}</div>",
                if hit.correct { " ok" } else { "" },
                thumb(classes, &hit.image),
                k + 1,
                if hit.correct {
                    " <span class=\"tick\">&#10003;</span>"
                } else {
                    ""
                },
                hit.score
            );
        }
        if q.rank > q.top.len() {
            let _ = write!(
                h,
                "<div class=\"hit ok\">{}{} <span class=\"tick\">&#10003;</span></div>",
                thumb(classes, &q.image),
                q.rank
            );
        }
        h.push_str("</div></div>\n");
    }
}

/// Retrieval examples by image: each image and its top captions (the right ones ticked).
fn html_image_queries(h: &mut String, qs: &[ImageQuery], classes: &BTreeMap<&str, String>) {
    for q in qs {
        let _ = write!(
            h,
            "<div class=\"q\"><div class=\"qi\">{}<div><p class=\"meta\" style=\"margin:0 0 4px\">{} &mdash; its best caption ranks {}</p><ol>",
            thumb(classes, &q.image),
            esc(&q.image),
            q.rank
        );
        for hit in &q.top {
            let _ = write!(
                h,
                "<li{}>{}{} <span class=\"meta\">{:.3}</span></li>",
                if hit.correct { " class=\"ok\"" } else { "" },
                esc(&hit.caption),
                if hit.correct {
                    " <span class=\"tick\">&#10003;</span>"
                } else {
                    ""
                },
                hit.score
            );
        }
        h.push_str("</ol>");
        if q.rank > q.top.len() {
            if let Some(t) = q.truth.first() {
                let _ = write!(
                    h,
                    "<p class=\"meta\" style=\"margin:6px 0 0\">its own captions, e.g. &ldquo;{}&rdquo;</p>",
                    esc(t)
                );
            }
        }
        h.push_str("</div></div></div>\n");
    }
}

fn html_block(h: &mut String, b: &Block, classes: &BTreeMap<&str, String>) {
    match b {
        Block::Heading(s) => {
            let _ = writeln!(h, "<h2>{}</h2>", esc(s));
        }
        Block::Subheading(s) => {
            let _ = writeln!(h, "<h3>{}</h3>", esc(s));
        }
        Block::Para(s) => {
            let _ = writeln!(h, "<p>{}</p>", inline_html(s));
        }
        Block::Bullets(items) => {
            h.push_str("<ul class=\"notes\">");
            for i in items {
                let _ = write!(h, "<li>{}</li>", inline_html(i));
            }
            h.push_str("</ul>\n");
        }
        Block::Cards(cards) => {
            h.push_str("<div class=\"cards\">");
            for c in cards {
                let _ = write!(
                    h,
                    "<div class=\"card\"><div class=\"l\">{}</div><div class=\"v\">{}</div><div class=\"n\">{}</div></div>",
                    esc(&c.label),
                    esc(&c.value),
                    esc(&c.note)
                );
            }
            h.push_str("</div>\n");
        }
        Block::Table(t) => html_table(h, t),
        Block::Figure { svg, caption, .. } => {
            let _ = writeln!(
                h,
                "<figure>{}<figcaption>{}</figcaption></figure>",
                inline_svg(svg),
                inline_html(caption)
            );
        }
        Block::TextQueries(qs) => html_text_queries(h, qs, classes),
        Block::ImageQueries(qs) => html_image_queries(h, qs, classes),
        Block::Fold(summary, inner) => {
            let _ = writeln!(h, "<details><summary>{}</summary>", esc(summary));
            for b in inner {
                html_block(h, b, classes);
            }
            h.push_str("</details>\n");
        }
    }
}

fn md_table(m: &mut String, t: &Table) {
    let head: Vec<String> = if t.head.is_empty() {
        vec![String::new(); t.rows.first().map_or(1, Vec::len)]
    } else {
        t.head.clone()
    };
    let _ = writeln!(
        m,
        "| {} |",
        head.iter().map(|c| md(c)).collect::<Vec<_>>().join(" | ")
    );
    let _ = writeln!(
        m,
        "|{}|",
        (0..head.len())
            .map(|i| if t.numeric && i > 0 {
                " ---: "
            } else {
                " --- "
            })
            .collect::<Vec<_>>()
            .join("|")
    );
    for (i, r) in t.rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .map(|c| {
                if t.strong.contains(&i) && !c.is_empty() {
                    format!("**{}**", md(c))
                } else {
                    md(c)
                }
            })
            .collect();
        let _ = writeln!(m, "| {} |", cells.join(" | "));
    }
    m.push('\n');
}

fn md_block(m: &mut String, b: &Block, level: usize) {
    let hashes = "#".repeat(level);
    match b {
        Block::Heading(s) => {
            let _ = writeln!(m, "{hashes} {}\n", md(s));
        }
        Block::Subheading(s) => {
            let _ = writeln!(m, "{hashes}# {}\n", md(s));
        }
        Block::Para(s) => {
            let _ = writeln!(m, "{}\n", md(s));
        }
        Block::Bullets(items) => {
            for i in items {
                let _ = writeln!(m, "- {}", md(i));
            }
            m.push('\n');
        }
        Block::Cards(cards) => {
            for c in cards {
                let note = if c.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", md(&c.note))
                };
                let _ = writeln!(m, "- **{}**: {}{note}", md(&c.label), md(&c.value));
            }
            m.push('\n');
        }
        Block::Table(t) => md_table(m, t),
        Block::Figure { file, caption, .. } => {
            let _ = writeln!(m, "![{}]({file})\n", md(caption));
        }
        Block::TextQueries(qs) => {
            for q in qs {
                let _ = writeln!(
                    m,
                    "- \"{}\" (its image {} ranks {}): {}",
                    md(&q.caption),
                    md_code(&q.image),
                    q.rank,
                    q.top
                        .iter()
                        .map(|h| format!(
                            "{}{}",
                            md_code(&h.image),
                            if h.correct { " ✓" } else { "" }
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            m.push('\n');
        }
        Block::ImageQueries(qs) => {
            for q in qs {
                let _ = writeln!(
                    m,
                    "- {} (its best caption ranks {}):",
                    md_code(&q.image),
                    q.rank
                );
                for (k, h) in q.top.iter().enumerate() {
                    let _ = writeln!(
                        m,
                        "  {}. {}{}",
                        k + 1,
                        md(&h.caption),
                        if h.correct { " ✓" } else { "" }
                    );
                }
            }
            m.push('\n');
        }
        Block::Fold(summary, inner) => {
            let _ = writeln!(m, "{hashes}# {}\n", md(summary));
            for b in inner {
                md_block(m, b, level + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_code_spans_kept() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(
            inline_html("see `a<b` here"),
            "see <code>a&lt;b</code> here"
        );
        assert_eq!(inline_html("one ` tick"), "one ` tick");
        // Markdown: `<` escaped outside code spans only (an entity inside one shows as written)
        assert_eq!(md("a<b `c<d` e|f"), "a&lt;b `c<d` e\\|f");
        assert_eq!(md_code("x<y|z.png"), "`x<y\\|z.png`");
        assert_eq!(md_code("a`b"), "`` a`b ``");
        let page = Page {
            title: "t <x>".into(),
            blocks: vec![Block::Table(Table {
                head: vec!["a".into(), "b".into()],
                rows: vec![vec!["x|y".into(), "1.00".into()]],
                strong: vec![0],
                numeric: true,
            })],
            ..Page::default()
        };
        assert!(page.html().contains("<title>t &lt;x&gt;</title>"));
        let m = page.markdown();
        assert!(m.contains("| **x\\|y** | **1.00** |"), "{m}");
        assert!(m.contains("| --- | ---: |"), "{m}");
    }
}
