//! `cargo xtask fetch-data` against a small HTTP server on 127.0.0.1 that plays the Hugging Face
//! Hub (hf-hub's `resolve` URLs, through `HF_ENDPOINT`), GitHub raw files and the GitHub
//! releases API, with tiny fake files: downloads, a broken download and its resume, checksum
//! failures, an unreachable host, unpacking and placing a dataset by its annotations, and
//! idempotence.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::Digest;

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    /// paths whose next full download stops half-way
    broken: HashSet<String>,
    /// (path, first byte asked for) of every body request
    requests: Vec<(String, u64)>,
}

/// Serve `state` on 127.0.0.1 (one thread, one connection at a time); returns the base URL.
fn serve(state: Arc<Mutex<State>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range: Option<(u64, Option<u64>)> = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse().unwrap(), b.parse().ok()));
                }
            }
            let mut st = state.lock().unwrap();
            let Some(body) = st.files.get(&path).cloned() else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let total = body.len() as u64;
            let (start, end) = match range {
                Some((a, b)) => (a, b.unwrap_or(total - 1).min(total - 1)),
                None => (0, total - 1),
            };
            let probe = range == Some((0, Some(0)));
            if !probe {
                st.requests.push((path.clone(), start));
            }
            let cut = !probe && start == 0 && st.broken.remove(&path);
            drop(st);
            let etag = format!("{:x}", sha2::Sha256::digest(&body));
            let status = if range.is_some() {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{total}\r\n\
                 ETag: \"{etag}\"\r\nX-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\n\
                 Accept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                end - start + 1
            );
            let _ = stream.write_all(head.as_bytes());
            let slice = &body[start as usize..=end as usize];
            let slice = if cut {
                &slice[..slice.len() / 2]
            } else {
                slice
            };
            let _ = stream.write_all(slice);
            let _ = stream.flush();
        }
    });
    base
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-fetch-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// A fake RSITMD: annotations naming 3 images, and a zip holding them under another prefix
/// (plus a file nobody names).
fn fake_dataset() -> (Vec<(&'static str, Vec<u8>)>, Vec<u8>) {
    let train = br#"[{"caption": "a", "image": "train/a_1.tif", "image_id": 0},
                      {"caption": "b", "image": "train/a_1.tif", "image_id": 0},
                      {"caption": "c", "image": "train/b_2.tif", "image_id": 1}]"#;
    let val = br#"[{"image": "val/c_3.tif", "caption": ["x", "y"]}]"#;
    let test = br#"[{"image": "test/c_3.tif", "caption": ["z"]}]"#;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for (name, bytes) in [
        ("pkg/RSITMD/images/train/a_1.tif", b"AAAA".as_slice()),
        ("pkg/RSITMD/images/train/b_2.tif", b"BBBB"),
        ("pkg/RSITMD/images/val/c_3.tif", b"CCCV"),
        ("pkg/RSITMD/images/test/c_3.tif", b"CCCT"),
        ("pkg/README.txt", b"unnamed"),
    ] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    (
        vec![
            ("train", train.to_vec()),
            ("val", val.to_vec()),
            ("test", test.to_vec()),
        ],
        zip,
    )
}

struct Setup {
    dir: PathBuf,
    base: String,
    state: Arc<Mutex<State>>,
    sources: PathBuf,
    model: Vec<u8>,
    release: Vec<u8>,
}

fn setup(name: &str, wrong_sha_for_val: bool) -> Setup {
    let dir = temp_dir(name);
    let state = Arc::new(Mutex::new(State::default()));
    let base = serve(state.clone());
    let (annotations, zip) = fake_dataset();
    let model: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let release: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let mut files = HashMap::new();
    let mut ann = serde_json::Map::new();
    for (split, bytes) in &annotations {
        let path = format!("data/finetune/fake_{split}.json");
        files.insert(format!("/raw/test/annot/main/{path}"), bytes.clone());
        let digest = if wrong_sha_for_val && *split == "val" {
            "0".repeat(64)
        } else {
            sha(bytes)
        };
        ann.insert(
            format!("{split}.json"),
            serde_json::json!({"path": path, "sha256": digest}),
        );
    }
    files.insert("/test/model/resolve/main/ckpt/m.pt".into(), model.clone());
    files.insert("/datasets/test/data/resolve/main/rsitmd.zip".into(), zip);
    files.insert("/release/harma_rsitmd_x.pth".into(), release.clone());
    files.insert("/release/other.pth".into(), b"no".to_vec());
    let listing = serde_json::json!({"assets": [
        {"name": "harma_rsitmd_x.pth", "browser_download_url": format!("{base}/release/harma_rsitmd_x.pth")},
        {"name": "other.pth", "browser_download_url": format!("{base}/release/other.pth")},
    ]});
    files.insert(
        "/api/repos/test/annot/releases/tags/checkpoints".into(),
        listing.to_string().into_bytes(),
    );
    state.lock().unwrap().files = files;
    let sources = serde_json::json!({
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
    });
    let path = dir.join("sources.json");
    std::fs::write(&path, sources.to_string()).unwrap();
    Setup {
        dir,
        base,
        state,
        sources: path,
        model,
        release,
    }
}

impl Setup {
    fn fetch(&self, args: &[&str], hf_endpoint: Option<&str>) -> (bool, String) {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.arg("fetch-data")
            .arg("--sources")
            .arg(&self.sources)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(args)
            .env("HF_ENDPOINT", hf_endpoint.unwrap_or(&self.base))
            .env("HF_HOME", self.dir.join("hf"))
            .env("HARMA_GITHUB_RAW", format!("{}/raw", self.base))
            .env("HARMA_GITHUB_API", format!("{}/api", self.base));
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

fn read(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

#[test]
fn fetches_resumes_broken_downloads_and_is_idempotent() {
    let s = setup("main", false);
    // an unreachable hub: a clear error, nothing placed
    let (ok, text) = s.fetch(
        &["--model", "m", "--dataset", "none"],
        Some("http://127.0.0.1:9"),
    );
    assert!(!ok && text.contains("Check the network"), "{text}");
    assert!(!s.data().join("models/m.pt").exists());

    // the model download and the release download both break half-way once
    {
        let mut st = s.state.lock().unwrap();
        st.broken
            .insert("/test/model/resolve/main/ckpt/m.pt".into());
        st.broken.insert("/release/harma_rsitmd_x.pth".into());
    }
    let (ok, text) = s.fetch(&["--model", "m,rel", "--dataset", "rsitmd"], None);
    // hf-hub retries within the run (resuming); the plain download stops with advice
    assert!(!ok, "{text}");
    assert!(
        text.contains("broke off") && text.contains("again"),
        "{text}"
    );
    assert!(s.data().join("models/m.pt").exists(), "{text}");
    assert_eq!(read(&s.data().join("models/m.pt")), s.model);
    assert!(!s.data().join("models/harma_rsitmd_x.pth").exists());
    assert!(s.data().join("models/harma_rsitmd_x.pth.part").exists());
    // the dataset: annotations checked and placed, images found in the zip by their paths
    let ds = s.data().join("rsitmd");
    assert_eq!(read(&ds.join("images/train/a_1.tif")), b"AAAA");
    assert_eq!(read(&ds.join("images/val/c_3.tif")), b"CCCV");
    assert_eq!(read(&ds.join("images/test/c_3.tif")), b"CCCT");
    assert!(ds.join(".complete").exists() && !ds.join(".unpack").exists());

    // the second run resumes the broken file from where it stopped
    let (ok, text) = s.fetch(&["--model", "m,rel", "--dataset", "rsitmd"], None);
    assert!(ok, "{text}");
    assert_eq!(read(&s.data().join("models/harma_rsitmd_x.pth")), s.release);
    assert!(
        !s.data().join("models/other.pth").exists(),
        "only the named assets"
    );
    let requests = s.state.lock().unwrap().requests.clone();
    let resumed = |p: &str| requests.iter().any(|(q, start)| q == p && *start > 0);
    assert!(resumed("/release/harma_rsitmd_x.pth"), "{requests:?}");
    assert!(
        resumed("/test/model/resolve/main/ckpt/m.pt"),
        "{requests:?}"
    );

    // a third run downloads nothing
    let before = s.state.lock().unwrap().requests.len();
    let (ok, text) = s.fetch(&["--model", "m,rel", "--dataset", "rsitmd"], None);
    assert!(ok, "{text}");
    assert_eq!(s.state.lock().unwrap().requests.len(), before, "{text}");
    let (ok, text) = s.fetch(&["--list"], None);
    assert!(
        ok && text.contains("complete") && text.contains("in place"),
        "{text}"
    );
    std::fs::remove_dir_all(&s.dir).ok();
}

#[test]
fn a_file_with_the_wrong_checksum_is_never_placed() {
    let s = setup("sha", true);
    let (ok, text) = s.fetch(&["--model", "none", "--dataset", "rsitmd"], None);
    assert!(!ok && text.contains("sha256"), "{text}");
    let ds = s.data().join("rsitmd");
    assert!(ds.join("train.json").exists());
    assert!(!ds.join("val.json").exists() && !ds.join("val.json.part").exists());
    assert!(!ds.join(".complete").exists());
    let (ok, text) = s.fetch(&["--model", "nonesuch"], None);
    assert!(!ok && text.contains("unknown model `nonesuch`"), "{text}");
    std::fs::remove_dir_all(&s.dir).ok();
}
