//! `cargo xtask fetch-data` against a small HTTP server on 127.0.0.1 that plays the Hugging Face
//! Hub (`resolve` URLs through `HF_ENDPOINT`, the ETag being the file's sha256 as for LFS
//! files), GitHub raw files and the GitHub releases API, with tiny fake files, and that
//! misbehaves on request: transfers that break off, lie about their length, ignore ranges,
//! corrupt the body or stall. Each test crafts its hostile inputs (names, archives, leftover
//! partial files) and checks the error names what it refused, that nothing is written
//! outside the test's folder, and that no run hangs. `HARMA_TEST_SHOW=1 cargo test -p xtask
//! --test fetch -- --nocapture` prints every run's output.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::Digest;

mod common;
use common::{serve, State};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-fetch-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

fn zip_bytes(entries: &[(&str, &[u8])], link: Option<(&str, &str)>) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for (name, bytes) in entries {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    if let Some((name, target)) = link {
        zip.add_symlink(name, target, opts).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A zip whose member `name` declares `size` bytes (local and central headers), whatever it
/// holds.
fn declare_size(zip: &[u8], name: &str, size: u32) -> Vec<u8> {
    let mut z = zip.to_vec();
    let n = name.len();
    for (sig, size_at, name_at) in [(b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)] {
        for i in 0..z.len().saturating_sub(name_at + n) {
            if &z[i..i + 4] == sig && &z[i + name_at..i + name_at + n] == name.as_bytes() {
                z[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
            }
        }
    }
    z
}

/// A .tar.gz whose member names are written raw (tar::Builder refuses `..` itself).
fn tar_gz_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

const TRAIN: &[u8] = br#"[{"caption": "a", "image": "train/a_1.tif", "image_id": 0},
                          {"caption": "b", "image": "train/a_1.tif", "image_id": 0},
                          {"caption": "c", "image": "train/b_2.tif", "image_id": 1}]"#;
const VAL: &[u8] = br#"[{"image": "val/c_3.tif", "caption": ["x", "y"]}]"#;
const TEST: &[u8] = br#"[{"image": "test/c_3.tif", "caption": ["z"]}]"#;

/// The images of the fake RSITMD, as its archive holds them (under another prefix).
const IMAGES: [(&str, &[u8]); 4] = [
    ("pkg/RSITMD/images/train/a_1.tif", b"AAAA"),
    ("pkg/RSITMD/images/train/b_2.tif", b"BBBB"),
    ("pkg/RSITMD/images/val/c_3.tif", b"CCCV"),
    ("pkg/RSITMD/images/test/c_3.tif", b"CCCT"),
];

fn fake_zip() -> Vec<u8> {
    let mut entries = IMAGES.to_vec();
    entries.push(("pkg/README.txt", b"unnamed"));
    zip_bytes(&entries, None)
}

const MODEL: &str = "/test/model/resolve/main/ckpt/m.pt";
const ZIP: &str = "/datasets/test/data/resolve/main/rsitmd.zip";
const RELEASE: &str = "/release/harma_rsitmd_x.pth";
const LISTING: &str = "/api/repos/test/annot/releases/tags/checkpoints";

fn raw_path(split: &str) -> String {
    format!("/raw/test/annot/main/data/finetune/fake_{split}.json")
}

struct Setup {
    dir: PathBuf,
    base: String,
    state: Arc<Mutex<State>>,
    /// written before each run: tests edit it
    sources: serde_json::Value,
    model: Vec<u8>,
    release: Vec<u8>,
}

fn setup(name: &str) -> Setup {
    let dir = temp_dir(name);
    let state = Arc::new(Mutex::new(State::default()));
    let base = serve(state.clone());
    let model: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let release: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let mut files = HashMap::new();
    let mut ann = serde_json::Map::new();
    for (split, bytes) in [("train", TRAIN), ("val", VAL), ("test", TEST)] {
        files.insert(raw_path(split), bytes.to_vec());
        ann.insert(
            format!("{split}.json"),
            serde_json::json!({"path": format!("data/finetune/fake_{split}.json"), "sha256": sha(bytes)}),
        );
    }
    files.insert(MODEL.into(), model.clone());
    files.insert(ZIP.into(), fake_zip());
    files.insert(RELEASE.into(), release.clone());
    files.insert("/release/other.pth".into(), b"no".to_vec());
    state.lock().unwrap().files = files;
    let s = Setup {
        sources: serde_json::json!({
            "models": {
                "m": {"hf": {"repo": "test/model", "type": "model", "file": "ckpt/m.pt",
                              "sha256": sha(&model)},
                      "dest": "models/m.pt", "licence": "test"},
                "rel": {"github_release": {"repo": "test/annot", "tag": "checkpoints", "prefix": "harma_rsitmd"},
                        "dest": "models/", "licence": "test"}
            },
            "datasets": {
                "rsitmd": {
                    "annotations": {"github": "test/annot", "branch": "main", "files": ann},
                    "images": {"hf": {"repo": "test/data", "type": "dataset", "file": "rsitmd.zip"}},
                    "licence": "test"
                }
            }
        }),
        dir,
        base,
        state,
        model,
        release,
    };
    s.list_assets(&[
        ("harma_rsitmd_x.pth", RELEASE, None),
        ("other.pth", "/release/other.pth", None),
    ]);
    s
}

impl Setup {
    fn fetch(&self, args: &[&str], hf_endpoint: Option<&str>) -> (bool, String) {
        let sources = self.dir.join("sources.json");
        std::fs::write(&sources, self.sources.to_string()).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.arg("fetch-data")
            .arg("--sources")
            .arg(&sources)
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .env("HF_ENDPOINT", hf_endpoint.unwrap_or(&self.base))
            .env("HF_HOME", self.dir.join("hf"))
            .env_remove("HF_TOKEN")
            .env("HARMA_GITHUB_RAW", format!("{}/raw", self.base))
            .env("HARMA_GITHUB_API", format!("{}/api", self.base));
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if std::env::var_os("HARMA_TEST_SHOW").is_some() {
            eprintln!("=== {args:?}\n{text}");
        }
        (out.status.success(), text)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn serve(&self, path: &str, bytes: Vec<u8>) {
        self.state.lock().unwrap().files.insert(path.into(), bytes);
    }

    /// The release lists these assets: (name, path served, digest).
    fn list_assets(&self, assets: &[(&str, &str, Option<&str>)]) {
        let files = self.state.lock().unwrap().files.clone();
        let list: Vec<serde_json::Value> = assets
            .iter()
            .map(|(name, path, digest)| {
                let mut a = serde_json::json!({"name": name,
                    "browser_download_url": format!("{}{path}", self.base)});
                if let Some(b) = files.get(*path) {
                    a["size"] = b.len().into();
                }
                if let Some(d) = digest {
                    a["digest"] = (*d).into();
                }
                a
            })
            .collect();
        let listing = serde_json::json!({ "assets": list });
        self.serve(LISTING, listing.to_string().into_bytes());
    }

    /// Serve new annotations for `split` and pin them.
    fn annotate(&mut self, split: &str, bytes: &[u8]) {
        self.serve(&raw_path(split), bytes.to_vec());
        self.sources["datasets"]["rsitmd"]["annotations"]["files"][format!("{split}.json")]
            ["sha256"] = sha(bytes).into();
    }

    /// Requests (first byte, status) for `path`.
    fn requests(&self, path: &str) -> Vec<(u64, u16)> {
        let st = self.state.lock().unwrap();
        st.requests
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, a, s)| (*a, *s))
            .collect()
    }

    fn hf_blob(&self, repo: &str, bytes: &[u8]) -> PathBuf {
        self.dir
            .join("hf/hub")
            .join(repo)
            .join("blobs")
            .join(sha(bytes))
    }

    /// Every file under the test's folder is in the data folder, the Hugging Face cache or
    /// is the sources file.
    fn nothing_written_outside(&self) {
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p == self.data() || p == self.dir.join("hf") {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else {
                    assert_eq!(p, self.dir.join("sources.json"), "written outside");
                }
            }
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn read(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .read_to_end(&mut v)
        .unwrap();
    v
}

use harma_fetch::files_under;

fn all() -> [&'static str; 4] {
    ["--model", "m,rel", "--dataset", "rsitmd"]
}

#[test]
fn fetches_resumes_broken_downloads_and_is_idempotent() {
    let s = setup("main");
    // an unreachable hub: a clear error, nothing placed
    let (ok, text) = s.fetch(
        &["--model", "m", "--dataset", "none"],
        Some("http://127.0.0.1:9"),
    );
    assert!(!ok && text.contains("Check the network"), "{text}");
    assert!(!s.data().join("models/m.pt").exists());

    // the model breaks off once (resumed within the run); the release asset breaks off on
    // every try of this run (1 + 3 resumptions), so the run stops with advice
    {
        let mut st = s.state.lock().unwrap();
        st.broken.insert(MODEL.into(), 1);
        st.broken.insert(RELEASE.into(), 4);
    }
    let (ok, text) = s.fetch(&all(), None);
    assert!(!ok, "{text}");
    assert!(
        text.contains("broke off") && text.contains("again"),
        "{text}"
    );
    assert_eq!(read(&s.data().join("models/m.pt")), s.model);
    assert!(s.requests(MODEL).iter().any(|r| r.0 > 0), "resumed");
    assert!(!s.data().join("models/harma_rsitmd_x.pth").exists());
    assert!(s.data().join("models/harma_rsitmd_x.pth.part").exists());
    // the dataset: annotations checked and placed, images found in the zip by their paths
    let ds = s.data().join("rsitmd");
    assert_eq!(read(&ds.join("images/train/a_1.tif")), b"AAAA");
    assert_eq!(read(&ds.join("images/val/c_3.tif")), b"CCCV");
    assert_eq!(read(&ds.join("images/test/c_3.tif")), b"CCCT");
    assert!(ds.join(".complete").exists() && !ds.join(".unpack").exists());
    assert!(
        !ds.join("images/pkg").exists(),
        "only the named members are unpacked"
    );
    // the Hugging Face cache is laid out as hf-hub and huggingface_hub do
    let snapshot = s.dir.join(
        "hf/hub/models--test--model/snapshots/0123456789abcdef0123456789abcdef01234567/ckpt/m.pt",
    );
    assert_eq!(read(&snapshot), s.model);

    // the second run resumes the broken file from where it stopped
    let (ok, text) = s.fetch(&all(), None);
    assert!(ok, "{text}");
    assert_eq!(read(&s.data().join("models/harma_rsitmd_x.pth")), s.release);
    assert!(
        !s.data().join("models/other.pth").exists(),
        "only the named assets"
    );
    let last = *s.requests(RELEASE).last().unwrap();
    assert!(last.0 > 0 && last.1 == 206, "{last:?}");

    // a third run downloads nothing
    let before = s.state.lock().unwrap().requests.len();
    let (ok, text) = s.fetch(&all(), None);
    assert!(ok, "{text}");
    assert_eq!(s.state.lock().unwrap().requests.len(), before, "{text}");
    let (ok, text) = s.fetch(&["--list"], None);
    assert!(
        ok && text.contains("complete") && text.contains("in place"),
        "{text}"
    );
    s.nothing_written_outside();
}

#[test]
fn a_file_with_the_wrong_checksum_is_never_placed() {
    let mut s = setup("sha");
    s.sources["datasets"]["rsitmd"]["annotations"]["files"]["val.json"]["sha256"] =
        "0".repeat(64).into();
    let (ok, text) = s.fetch(&["--model", "none", "--dataset", "rsitmd"], None);
    assert!(!ok && text.contains("sha256"), "{text}");
    let ds = s.data().join("rsitmd");
    assert!(ds.join("train.json").exists());
    assert!(!ds.join("val.json").exists() && !ds.join("val.json.part").exists());
    assert!(!ds.join(".complete").exists());
    let (ok, text) = s.fetch(&["--model", "nonesuch"], None);
    assert!(!ok && text.contains("unknown model `nonesuch`"), "{text}");
}

#[test]
fn names_that_would_land_outside_are_refused() {
    let mut s = setup("names");
    let far = format!("escape-{}.tif", std::process::id());
    let only = ["--model", "none", "--dataset", "rsitmd"];
    // annotation `image` fields: refused before the archive is even fetched
    for name in [
        "../escape.tif".to_string(),
        "train/../../escape.tif".into(),
        "../../../escape.tif".into(),
        format!("../../../../{far}"),
        format!("/tmp/{far}"),
        "C:\\escape.tif".into(),
        "..\\..\\escape.tif".into(),
        String::new(),
        "a\0b.tif".into(),
        "...".into(),
    ] {
        let train = serde_json::json!([
            {"caption": "a", "image": "train/a_1.tif", "image_id": 0},
            {"caption": "b", "image": name, "image_id": 1},
        ]);
        s.annotate("train", train.to_string().as_bytes());
        std::fs::remove_file(s.data().join("rsitmd/train.json")).ok();
        let (ok, text) = s.fetch(&only, None);
        let shown = format!("`{}`", name.escape_debug());
        assert!(
            !ok && text.contains("train.json: entry 1: image")
                && text.contains(&shown)
                && text.contains("refused"),
            "{name:?}: {text}"
        );
        assert!(s.requests(ZIP).is_empty(), "{name:?}: nothing is unpacked");
    }
    s.annotate("train", TRAIN);
    std::fs::remove_file(s.data().join("rsitmd/train.json")).ok();

    // release asset names (each starts with the prefix the source asks for)
    for name in [
        "harma_rsitmd/../../../escape.pth",
        "harma_rsitmd\\..\\..\\escape.pth",
        "harma_rsitmd_\0.pth",
        "harma_rsitmd:stream.pth",
        "harma_rsitmd/x.pth",
    ] {
        s.list_assets(&[(name, RELEASE, None)]);
        let (ok, text) = s.fetch(&["--model", "rel", "--dataset", "none"], None);
        let shown = format!("`{}`", name.escape_debug());
        assert!(
            !ok && text.contains("release asset")
                && text.contains(&shown)
                && text.contains("refused"),
            "{name:?}: {text}"
        );
        assert!(
            s.requests(RELEASE).is_empty(),
            "{name:?}: nothing is downloaded"
        );
    }

    // archive members: a hostile name anywhere refuses the archive; a link is never followed
    let mut evil = IMAGES.to_vec();
    evil.push(("../../../escape/train/a_1.tif", b"EVIL"));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "rsitmd.zip",
            zip_bytes(&evil, None),
            "`../../../escape/train/a_1.tif` would land outside",
        ),
        (
            "rsitmd.zip",
            zip_bytes(
                &evil[..0],
                Some(("pkg/train/a_1.tif", "../../../../etc/passwd")),
            ),
            "`pkg/train/a_1.tif` is a link, not a file",
        ),
        (
            "rsitmd.tar.gz",
            tar_gz_bytes(&[("pkg/train/a_1.tif", b"AAAA"), ("../escape/x.tif", b"EVIL")]),
            "`../escape/x.tif` climbs out of its folder",
        ),
        (
            "rsitmd.tar.gz",
            tar_gz_bytes(&[("/abs/train/a_1.tif", b"EVIL")]),
            "`/abs/train/a_1.tif` is an absolute path",
        ),
    ];
    for (file, bytes, want) in cases {
        s.sources["datasets"]["rsitmd"]["images"]["hf"]["file"] = file.into();
        s.serve(&format!("/datasets/test/data/resolve/main/{file}"), bytes);
        let (ok, text) = s.fetch(&only, None);
        assert!(
            !ok && text.contains(want) && text.contains("refused"),
            "{want}: {text}"
        );
        let ds = s.data().join("rsitmd");
        assert!(
            !ds.join("images").exists() && !ds.join(".unpack").exists(),
            "{want}"
        );
    }

    // the Hub's ETag and commit id become cache paths: only plain tokens are taken
    for (header, value) in [
        ("X-Linked-Etag", "../../../../escape"),
        ("ETag", "\"a/../../b\""),
        ("X-Repo-Commit", "../../../../escape"),
    ] {
        let mut st = s.state.lock().unwrap();
        st.headers
            .insert(MODEL.into(), vec![(header.into(), value.into())]);
        drop(st);
        let (ok, text) = s.fetch(&["--model", "m", "--dataset", "none"], None);
        assert!(
            !ok && text.contains("not a plain token: refused"),
            "{header}: {text}"
        );
        assert!(
            s.requests(MODEL).is_empty(),
            "{header}: nothing is downloaded"
        );
    }
    s.nothing_written_outside();
    assert!(!std::env::temp_dir().join(&far).exists());
    assert!(!Path::new("/tmp").join(&far).exists());
}

#[test]
fn downloads_that_could_never_finish_now_finish() {
    let s = setup("stuck");
    let ds = s.data().join("rsitmd");
    std::fs::create_dir_all(&ds).unwrap();
    // left by a run killed between the last write and the rename: the whole file
    std::fs::write(ds.join("val.json.part"), VAL).unwrap();
    // the right size, the wrong bytes
    let mut wrong = TEST.to_vec();
    wrong[3] ^= 1;
    std::fs::write(ds.join("test.json.part"), &wrong).unwrap();
    // longer than the file
    std::fs::write(ds.join("train.json.part"), [TRAIN, TRAIN].concat()).unwrap();
    // the Hub: hf-hub's cache `.part`, whole (not asked for again) ...
    let blob = s.hf_blob("models--test--model", &s.model);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(blob.with_extension("part"), &s.model).unwrap();
    // ... and a dataset archive whose `.part` grew to twice its size (hf-hub's retry)
    let zip = fake_zip();
    let zblob = s.hf_blob("datasets--test--data", &zip);
    std::fs::create_dir_all(zblob.parent().unwrap()).unwrap();
    std::fs::write(zblob.with_extension("part"), [&zip[..], &zip[..]].concat()).unwrap();
    // a server that announces 100 bytes more than it sends, for a file of known size
    s.state.lock().unwrap().lying.insert(RELEASE.into());
    let (ok, text) = s.fetch(&all(), None);
    assert!(ok, "{text}");
    assert_eq!(read(&ds.join("val.json")), VAL);
    assert_eq!(
        s.requests(&raw_path("val")),
        [(VAL.len() as u64, 416)],
        "not downloaded again"
    );
    assert_eq!(read(&ds.join("test.json")), TEST);
    assert_eq!(
        s.requests(&raw_path("test")),
        [(TEST.len() as u64, 416), (0, 200)]
    );
    assert_eq!(read(&ds.join("train.json")), TRAIN);
    assert_eq!(s.requests(&raw_path("train")).last(), Some(&(0, 200)));
    assert_eq!(read(&s.data().join("models/m.pt")), s.model);
    assert!(s.requests(MODEL).is_empty(), "the whole .part was used");
    assert_eq!(s.requests(ZIP), [(0, 200)], "the doubled .part was dropped");
    assert!(ds.join(".complete").exists());
    assert_eq!(read(&s.data().join("models/harma_rsitmd_x.pth")), s.release);
    let r = s.requests(RELEASE);
    assert_eq!(r, [(0, 200), (s.release.len() as u64, 416)], "{r:?}");
    for left in ["val.json.part", "test.json.part", "train.json.part"] {
        assert!(!ds.join(left).exists(), "{left}");
    }
    assert!(!blob.with_extension("part").exists() && !zblob.with_extension("part").exists());
    s.nothing_written_outside();
}

#[test]
fn servers_that_ignore_ranges_or_stall_do_not_block() {
    let s = setup("ranges");
    // half a file, resumed from a server that ignores ranges: started afresh
    let part = s.data().join("models/harma_rsitmd_x.pth.part");
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &s.release[..1000]).unwrap();
    s.state.lock().unwrap().no_ranges.insert(RELEASE.into());
    // the Hub stalls once (3 s) on the model: with --timeout 1 it is asked again
    s.state.lock().unwrap().stalled.insert(MODEL.into(), 1);
    let (ok, text) = s.fetch(
        &["--model", "m,rel", "--dataset", "none", "--timeout", "1"],
        None,
    );
    assert!(ok, "{text}");
    assert_eq!(read(&s.data().join("models/harma_rsitmd_x.pth")), s.release);
    assert_eq!(s.requests(RELEASE), [(1000, 200)]);
    assert_eq!(read(&s.data().join("models/m.pt")), s.model);
    // a server that never answers: the run ends with an error, it does not hang
    std::fs::remove_file(s.data().join("models/m.pt")).unwrap();
    std::fs::remove_dir_all(s.dir.join("hf")).unwrap();
    s.state.lock().unwrap().stalled.insert(MODEL.into(), 100);
    let (ok, text) = s.fetch(
        &["--model", "m", "--dataset", "none", "--timeout", "1"],
        None,
    );
    // the client gave up (its timeout), not the server (which stalls 100 s)
    assert!(!ok && text.contains("timed out"), "{text}");
    // a server that gives no size for a file of unknown size: refused before a byte is
    // written (it could send for ever), even where an unchecked file is allowed; one whose
    // size is known is fetched
    s.state.lock().unwrap().no_length.insert(RELEASE.into());
    std::fs::remove_file(s.data().join("models/harma_rsitmd_x.pth")).unwrap();
    let no_size = serde_json::json!({"assets": [{"name": "harma_rsitmd_x.pth",
        "browser_download_url": format!("{}{RELEASE}", s.base)}]});
    s.serve(LISTING, no_size.to_string().into_bytes());
    let (ok, text) = s.fetch(
        &["--model", "rel", "--dataset", "none", "--allow-unverified"],
        None,
    );
    assert!(!ok && text.contains("announces no size"), "{text}");
    assert!(files_under(&s.data().join("models")).is_empty(), "{text}");
    s.list_assets(&[("harma_rsitmd_x.pth", RELEASE, None)]);
    let (ok, text) = s.fetch(&["--model", "rel", "--dataset", "none"], None);
    assert!(ok, "{text}");
    assert_eq!(read(&s.data().join("models/harma_rsitmd_x.pth")), s.release);
    s.nothing_written_outside();
}

#[test]
fn every_download_is_verified() {
    let mut s = setup("verify");
    let only_model = ["--model", "m", "--dataset", "none"];
    // the Hub's sha256 (its ETag) catches a body changed on the way, pinned or not
    s.sources["models"]["m"]["hf"]
        .as_object_mut()
        .unwrap()
        .remove("sha256");
    s.state.lock().unwrap().corrupt.insert(MODEL.into());
    let (ok, text) = s.fetch(&only_model, None);
    assert!(
        !ok && text.contains("sha256") && text.contains("m.pt"),
        "{text}"
    );
    let blob = s.hf_blob("models--test--model", &s.model);
    assert!(!s.data().join("models/m.pt").exists() && !blob.exists());
    assert!(!blob.with_extension("part").exists());
    s.state.lock().unwrap().corrupt.clear();
    let (ok, text) = s.fetch(&only_model, None);
    assert!(ok, "{text}");
    assert_eq!(read(&s.data().join("models/m.pt")), s.model);

    // a pin the Hub contradicts: nothing is downloaded
    std::fs::remove_file(s.data().join("models/m.pt")).unwrap();
    std::fs::remove_dir_all(s.dir.join("hf")).unwrap();
    for (key, value, want) in [
        (
            "sha256",
            serde_json::Value::from("1".repeat(64)),
            "pins sha256",
        ),
        ("size", 5.into(), "pins 5 bytes"),
    ] {
        let before = s.requests(MODEL).len();
        s.sources["models"]["m"]["hf"][key] = value;
        let (ok, text) = s.fetch(&only_model, None);
        assert!(
            !ok && text.contains(want) && text.contains("ckpt/m.pt"),
            "{text}"
        );
        assert_eq!(s.requests(MODEL).len(), before);
        s.sources["models"]["m"]["hf"]
            .as_object_mut()
            .unwrap()
            .remove(key);
    }

    // a release asset whose GitHub digest does not match
    s.list_assets(&[(
        "harma_rsitmd_x.pth",
        RELEASE,
        Some(&format!("sha256:{}", "2".repeat(64))),
    )]);
    let (ok, text) = s.fetch(&["--model", "rel", "--dataset", "none"], None);
    assert!(
        !ok && text.contains("sha256") && text.contains("harma_rsitmd_x.pth"),
        "{text}"
    );
    assert!(files_under(&s.data().join("models")).is_empty());
    s.list_assets(&[(
        "harma_rsitmd_x.pth",
        RELEASE,
        Some(&format!("sha256:{}", sha(&s.release))),
    )]);
    let (ok, text) = s.fetch(&["--model", "rel", "--dataset", "none"], None);
    assert!(ok, "{text}");

    // an annotation file pinned by its git blob id (as rsicd's train.json is)
    let files = &mut s.sources["datasets"]["rsitmd"]["annotations"]["files"]["train.json"];
    files.as_object_mut().unwrap().remove("sha256");
    files["git_sha1"] = "0".repeat(40).into();
    let (ok, text) = s.fetch(&["--model", "none", "--dataset", "rsitmd"], None);
    assert!(!ok && text.contains("git blob id"), "{text}");
    assert!(!s.data().join("rsitmd/train.json").exists());
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", TRAIN.len()).as_bytes());
    h.update(TRAIN);
    s.sources["datasets"]["rsitmd"]["annotations"]["files"]["train.json"]["git_sha1"] =
        format!("{:x}", h.finalize()).into();
    let (ok, text) = s.fetch(&["--model", "none", "--dataset", "rsitmd"], None);
    assert!(ok, "{text}");
    s.nothing_written_outside();
}

#[test]
fn archive_bombs_stop_at_their_limits() {
    let s = setup("bomb");
    let only = ["--model", "none", "--dataset", "rsitmd"];
    let ds = s.data().join("rsitmd");
    let zeros = vec![0u8; 1 << 20];
    let mut big = IMAGES.to_vec();
    big[0].1 = &zeros;
    let cases: Vec<(Vec<u8>, Vec<&str>, &str, &str)> = vec![
        // a named member larger than the limit says
        (
            zip_bytes(&big, None),
            vec!["--max-image-size", "100K"],
            "declares 1 MiB",
            IMAGES[0].0,
        ),
        // a named member that declares 4 bytes and inflates to 1 MiB
        (
            declare_size(&zip_bytes(&big, None), IMAGES[0].0, 4),
            vec!["--max-image-size", "100K"],
            "more than the 100 KiB allowed per file",
            IMAGES[0].0,
        ),
        // the members together larger than the total allowed
        (
            fake_zip(),
            vec!["--max-unpacked-size", "10"],
            "more than the 10 bytes allowed in total",
            IMAGES[1].0,
        ),
    ];
    for (zip, flags, want, member) in cases {
        s.serve(ZIP, zip);
        std::fs::remove_dir_all(s.dir.join("hf")).ok();
        let (ok, text) = s.fetch(&[&only[..], &flags].concat(), None);
        assert!(
            !ok && text.contains(want) && text.contains("refused"),
            "{want}: {text}"
        );
        assert!(
            text.contains(&format!("`{member}`")),
            "names the member: {text}"
        );
        assert!(
            !ds.join("images").exists() && !ds.join(".unpack").exists(),
            "{want}"
        );
        assert!(!ds.join(".complete").exists());
    }
    // a bomb nobody names is never unpacked; a stale temp folder of an earlier run goes
    let mut bomb = IMAGES.to_vec();
    let huge = vec![0u8; 20 << 20];
    bomb.push(("pkg/bomb.bin", &huge));
    let zip = zip_bytes(&bomb, None);
    assert!(zip.len() < 100_000);
    s.serve(ZIP, zip);
    std::fs::remove_dir_all(s.dir.join("hf")).ok();
    std::fs::create_dir_all(ds.join(".unpack/m0")).unwrap();
    std::fs::write(ds.join(".unpack/m0/junk"), vec![1u8; 1000]).unwrap();
    let (ok, text) = s.fetch(&[&only[..], &["--max-image-size", "1M"]].concat(), None);
    assert!(ok, "{text}");
    assert_eq!(
        files_under(&ds),
        [
            ".complete",
            "images/test/c_3.tif",
            "images/train/a_1.tif",
            "images/train/b_2.tif",
            "images/val/c_3.tif",
            "test.json",
            "train.json",
            "val.json"
        ]
    );
    // a damaged archive: an error naming it, the dataset left incomplete, no leftovers
    std::fs::remove_dir_all(&ds).unwrap();
    std::fs::remove_dir_all(s.dir.join("hf")).ok();
    let zip = fake_zip();
    s.serve(ZIP, zip[..zip.len() / 2].to_vec());
    let (ok, text) = s.fetch(&only, None);
    assert!(!ok && text.contains("not a valid zip"), "{text}");
    assert!(!ds.join(".unpack").exists() && !ds.join(".complete").exists());
    s.nothing_written_outside();
}

/// A release asset listed with neither a size nor a digest cannot be checked: refused, unless
/// asked for with --allow-unverified, and the log says it was not checked.
#[test]
fn a_download_nothing_can_check_is_refused_unless_allowed() {
    let s = setup("unverified");
    // listed before it is served: the listing carries no size (and no digest)
    s.state.lock().unwrap().files.remove(RELEASE);
    s.list_assets(&[("harma_rsitmd_x.pth", RELEASE, None)]);
    s.serve(RELEASE, s.release.clone());
    let args = ["--model", "rel", "--dataset", "none"];
    let (ok, text) = s.fetch(&args, None);
    assert!(
        !ok && text.contains("harma_rsitmd_x.pth")
            && text.contains("neither a size nor a checksum")
            && text.contains("--allow-unverified"),
        "{text}"
    );
    assert!(files_under(&s.data().join("models")).is_empty());
    let (ok, text) = s.fetch(&[&args[..], &["--allow-unverified"]].concat(), None);
    assert!(ok && text.contains("NOT checked"), "{text}");
    assert_eq!(read(&s.data().join("models/harma_rsitmd_x.pth")), s.release);
    s.nothing_written_outside();
}
