//! The store (transactions, interrupted batches, incremental updates, compaction) and the web
//! API (200s, 4xx, path traversal) on a small index made here from generated images and
//! chosen vectors; the model is replaced by a fixed text -> vector map.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harma_data::RgbImage;
use harma_raster::{crop, tile_grid, Tile};
use harma_search::serve::{self, App, ServeConfig};
use harma_search::store::{FileId, FileUpdate, Found, NewTile, Settings};
use harma_search::{Index, Writer};

const DIM: usize = 8;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-search-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn settings(images: &Path) -> Settings {
    let id = FileId {
        path: images.join("model.safetensors"),
        sha256: "ab".repeat(32),
        size: 1,
        mtime_ns: 1,
    };
    Settings {
        images: images.canonicalize().unwrap(),
        model: id,
        adapters: None,
        arch: "tiny".into(),
        arch_config: serde_json::json!({"embed_dim": DIM}),
        sharing: "text".into(),
        dim: DIM,
        image_size: 32,
        tile: 32,
        stride: 32,
        bands: None,
        shard: None,
    }
}

fn same(a: &Settings, b: &Settings) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err("different settings".into())
    }
}

/// A unit vector along axis `i % DIM`, tilted by `j` so every tile's vector differs.
fn unit(i: usize, j: usize) -> Vec<f32> {
    let mut v = [0.0f32; DIM];
    v[i % DIM] = 1.0;
    v[(i + 1) % DIM] = 0.01 * j as f32;
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

/// A test image whose pixels encode their position.
fn picture(w: usize, h: usize, seed: u8) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[(x * 3) as u8, (y * 5) as u8, seed]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn save_png(path: &Path, img: &RgbImage) {
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .unwrap()
        .save(path)
        .unwrap();
}

/// Add every tile of `files` (rel, w, h) in batches of `batch`; the vector of the n-th tile
/// overall is `unit(n, file index)`. Returns the tile count.
fn fill(w: &mut Writer, images: &Path, files: &[(&str, usize, usize)], batch: usize) -> usize {
    let found: Vec<Found> = files
        .iter()
        .map(|(rel, ..)| {
            let (size, mtime_ns) = harma_search::store::stat(&images.join(rel)).unwrap();
            Found {
                rel: rel.to_string(),
                size,
                mtime_ns,
            }
        })
        .collect();
    let (pending, _) = w.sync_files(&found).unwrap();
    let mut all = Vec::new();
    for p in &pending {
        let (_, fw, fh) = files.iter().find(|f| f.0 == p.rel).unwrap();
        let grid = tile_grid(*fw, *fh, 32, 32);
        for (seq, t) in grid.iter().enumerate().skip(p.tiles_done) {
            all.push((p.file_id, seq, *t, grid.len(), *fw, *fh));
        }
    }
    let mut n = 0;
    for chunk in all.chunks(batch) {
        let tiles: Vec<NewTile> = chunk
            .iter()
            .map(|c| NewTile {
                file_id: c.0,
                seq: c.1,
                tile: c.2,
            })
            .collect();
        let vectors: Vec<f32> = chunk
            .iter()
            .enumerate()
            .flat_map(|(i, c)| unit(n + i, c.0 as usize))
            .collect();
        let updates: Vec<FileUpdate> = chunk
            .iter()
            .filter(|c| c.1 == 0)
            .map(|c| FileUpdate {
                file_id: c.0,
                width: c.4,
                height: c.5,
                n_tiles: c.3,
                geo: None,
            })
            .collect();
        let done: Vec<i64> = chunk
            .iter()
            .filter(|c| c.1 + 1 == c.3)
            .map(|c| c.0)
            .collect();
        w.append(&tiles, &vectors, &updates, &done).unwrap();
        n += chunk.len();
    }
    n
}

#[test]
fn torn_batches_are_ignored_and_updates_are_incremental() {
    let dir = temp("store");
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    save_png(&images.join("a.png"), &picture(64, 64, 1)); // 4 tiles
    save_png(&images.join("sub/b.png"), &picture(80, 32, 2)); // 3 tiles (one edge)
    let out = dir.join("index");
    let s = settings(&images);
    let files = [("a.png", 64, 64), ("sub/b.png", 80, 32)];
    let mut w = Writer::open(&out, &s, same).unwrap();
    assert_eq!(fill(&mut w, &images, &files, 3), 7);
    drop(w);
    let before = Index::open(&out).unwrap().vectors().unwrap();
    assert_eq!(before.len(), 7);
    assert_eq!(before.get(before.ids[2]).unwrap(), unit(2, 1).as_slice());

    // an interrupted batch: its vectors written, never committed
    let vfile = out.join("vectors-0.f32");
    let committed = std::fs::metadata(&vfile).unwrap().len();
    assert_eq!(committed, 7 * DIM as u64 * 4);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&vfile)
        .unwrap()
        .write_all(&[7u8; 100])
        .unwrap();
    let seen = Index::open(&out).unwrap().vectors().unwrap();
    assert_eq!(
        (seen.ids.clone(), seen.data.clone()),
        (before.ids.clone(), before.data.clone())
    );
    // the next writer cuts the tail off; nothing is left to do
    let mut w = Writer::open(&out, &s, same).unwrap();
    assert_eq!(std::fs::metadata(&vfile).unwrap().len(), committed);
    assert_eq!(fill(&mut w, &images, &files, 3), 0);

    // a different model is refused
    let mut other = s.clone();
    other.model.sha256 = "cd".repeat(32);
    drop(w);
    let e = Writer::open(&out, &other, same).err().unwrap().to_string();
    assert!(e.contains("different settings"), "{e}");

    // b changes, a leftover of an interrupted compaction lies around, c is new
    std::thread::sleep(std::time::Duration::from_millis(20));
    save_png(&images.join("sub/b.png"), &picture(32, 32, 9));
    save_png(&images.join("c.png"), &picture(32, 64, 3));
    std::fs::write(out.join("vectors-1.f32"), b"leftover").unwrap();
    let mut w = Writer::open(&out, &s, same).unwrap();
    assert!(!out.join("vectors-1.f32").exists());
    let files = [("a.png", 64, 64), ("sub/b.png", 32, 32), ("c.png", 32, 64)];
    assert_eq!(fill(&mut w, &images, &files, 2), 3);
    assert_eq!(w.row_counts().unwrap(), (10, 7));
    // dropping b's 3 old rows (30%) compacts into the next file
    assert_eq!(w.compact().unwrap(), 3);
    assert!(out.join("vectors-1.f32").exists() && !out.join("vectors-0.f32").exists());
    drop(w);
    let mut index = Index::open(&out).unwrap();
    let after = index.vectors().unwrap();
    assert_eq!(after.len(), 7);
    // a's tiles kept their ids and vectors
    for (r, id) in before.ids.iter().enumerate().take(4) {
        assert_eq!(
            after.get(*id).unwrap(),
            &before.data[r * DIM..(r + 1) * DIM]
        );
    }
    let tiles = index.tiles(&after.ids).unwrap();
    let names: Vec<&str> = tiles.iter().map(|t| t.file.as_str()).collect();
    assert_eq!(
        names,
        [
            "a.png",
            "a.png",
            "a.png",
            "a.png",
            "sub/b.png",
            "c.png",
            "c.png"
        ]
    );
    assert_eq!(index.counts().unwrap(), (3, 0, 7));
    // a vanished file loses its tiles
    std::fs::remove_file(images.join("c.png")).unwrap();
    let mut w = Writer::open(&out, &s, same).unwrap();
    fill(&mut w, &images, &files[..2], 2);
    assert_eq!(w.row_counts().unwrap(), (7, 5));
    drop(w);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A served index over two images; the embedder maps "axis N" to `unit(N, 0)`.
fn app(dir: &Path) -> (App, PathBuf) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    save_png(&images.join("a.png"), &picture(64, 64, 1));
    save_png(&images.join("b.png"), &picture(48, 32, 2));
    let out = dir.join("index");
    let mut w = Writer::open(&out, &settings(&images), same).unwrap();
    fill(&mut w, &images, &[("a.png", 64, 64), ("b.png", 48, 32)], 4);
    drop(w);
    let embed: serve::TextEmbedder = Box::new(|q: &str| {
        let n: usize = q
            .strip_prefix("axis ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("cannot embed {q}"))?;
        Ok(unit(n, 0))
    });
    (
        App::new(Index::open(&out).unwrap(), None, embed).unwrap(),
        images,
    )
}

fn json(reply: &serve::Reply) -> serde_json::Value {
    assert_eq!(reply.content_type, "application/json");
    serde_json::from_slice(&reply.body).unwrap()
}

#[test]
fn json_api_answers_and_refuses() {
    let dir = temp("api");
    let (app, images) = app(&dir);
    let ok = app.handle("GET", "/api/search?q=axis+3&k=2");
    assert_eq!(ok.status, 200);
    let j = json(&ok);
    let r = j["results"].as_array().unwrap();
    assert_eq!((r.len(), j["total"].as_u64()), (2, Some(6)));
    // the 4th tile added (a.png's last) is the one along axis 3: unit(3, 1), whose score is
    // 1 / |(1, 0.01)|
    assert_eq!(r[0]["file"], "a.png");
    assert_eq!(
        (r[0]["x"].as_u64(), r[0]["y"].as_u64()),
        (Some(32), Some(32))
    );
    let want = 1.0 / (1.0f64 + 1e-4).sqrt();
    assert!((r[0]["score"].as_f64().unwrap() - want).abs() < 1e-6);
    assert_eq!(r[0]["rank"], 1);
    assert!(r[0]["score"].as_f64() > r[1]["score"].as_f64());
    // more like this: a tile's own vector finds it first
    let id = r[1]["id"].as_i64().unwrap();
    let like = json(&app.handle("GET", &format!("/api/search?like={id}&k=1")));
    assert_eq!(like["results"][0]["id"].as_i64(), Some(id));
    // b.png is 48x32: two tiles, the second moved back to end at the edge
    let b = json(&app.handle("GET", "/api/search?q=axis%205&k=1"));
    assert_eq!(b["results"][0]["file"], "b.png");
    assert_eq!(b["results"][0]["x"], 16);
    assert_eq!(b["results"][0]["edge"], 1);
    // default k
    let all = json(&app.handle("GET", "/api/search?q=axis%201"));
    assert_eq!(all["k"], 20);
    assert_eq!(all["results"].as_array().unwrap().len(), 6);

    // the page and the info
    let page = app.handle("GET", "/");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8(page.body)
        .unwrap()
        .contains("/api/search?"));
    let info = json(&app.handle("GET", "/api/info"));
    assert_eq!(
        (info["tiles"].as_u64(), info["files"].as_u64()),
        (Some(6), Some(2))
    );

    // a thumbnail is the tile's pixels
    let png = app.handle("GET", &format!("/api/tile/{}.png", r[0]["id"]));
    assert_eq!((png.status, png.content_type), (200, "image/png"));
    let got = image::load_from_memory(&png.body).unwrap().to_rgb8();
    let want = crop(
        &picture(64, 64, 1),
        &Tile {
            x: 32,
            y: 32,
            w: 32,
            h: 32,
            edge: 0,
        },
    );
    assert_eq!((got.width(), got.height()), (32, 32));
    assert_eq!(got.into_raw(), want.data);

    // bad requests: 4xx with a message that says what is wrong
    let long = format!("/api/search?q={}", "a".repeat(3000));
    for (url, status, says) in [
        ("/api/search", 400, "nothing to search for"),
        ("/api/search?q=", 400, "q is empty"),
        ("/api/search?q=%20%20", 400, "q is empty"),
        ("/api/search?q=axis+1&k=0", 400, "from 1 to 500"),
        ("/api/search?q=axis+1&k=501", 400, "from 1 to 500"),
        ("/api/search?q=axis+1&k=ten", 400, "k=ten"),
        ("/api/search?q=axis+1&k=-3", 400, "k=-3"),
        ("/api/search?q=axis+1&q=axis+2", 400, "given twice"),
        ("/api/search?q=axis+1&like=3", 400, "not both"),
        (
            "/api/search?q=axis+1&path=/etc/passwd",
            400,
            "unknown parameter `path`",
        ),
        ("/api/search?like=abc", 400, "tile id"),
        ("/api/search?like=999999", 404, "no tile 999999"),
        (long.as_str(), 400, "at most 2000"),
        ("/api/tile/abc.png", 400, "ID a number"),
        ("/api/tile/1.jpg", 400, "ID a number"),
        ("/api/tile/.png", 400, "ID a number"),
        ("/api/tile/99999999999999999999.png", 400, "ID a number"),
        ("/api/tile/999999.png", 404, "no tile 999999"),
        ("/nothing", 404, "no page /nothing"),
    ] {
        let reply = app.handle("GET", url);
        let j = json(&reply);
        let msg = j["error"].as_str().unwrap_or_default();
        assert_eq!(reply.status, status, "{url}: {msg}");
        assert!(msg.contains(says), "{url}: {msg}");
    }
    // the embedder's own failure is the server's (500), with its message
    let e = app.handle("GET", "/api/search?q=boats");
    assert_eq!(
        (e.status, json(&e)["error"].as_str()),
        (500, Some("cannot embed boats"))
    );
    let post = app.handle("POST", "/api/search?q=axis+1");
    assert_eq!(post.status, 405);
    // the icon browsers ask for: no content, not an error
    let icon = app.handle("GET", "/favicon.ico");
    assert_eq!((icon.status, icon.body.len()), (204, 0));
    drop(images);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Send one raw HTTP request; the status and the body.
/// `serve::run` on a free local port, on a thread of its own, with 2 workers.
struct Running {
    addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Running {
    fn start(app: serve::App) -> Self {
        // what `serve::run` serves with 2 threads and no log
        let cfg = ServeConfig {
            threads: 2,
            ..ServeConfig::default()
        };
        Self::start_with(app, cfg)
    }

    /// `serve::run_with` and `cfg`.
    fn start_with(app: serve::App, cfg: ServeConfig) -> Self {
        let listener = serve::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handle = {
            let (app, stop) = (Arc::new(app), stop.clone());
            std::thread::spawn(move || serve::run_with(app, listener, &cfg, &stop))
        };
        Self { addr, stop, handle }
    }

    /// Ask the server to stop, wake its accept loop and wait for it.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
        self.handle.join().unwrap();
    }
}

fn raw_request(addr: std::net::SocketAddr, target: &str) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => buf[p + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}

#[test]
fn requests_never_read_outside_the_indexed_folder() {
    let dir = temp("traversal");
    let (app, images) = app(&dir);
    // a secret beside the images folder, and a link to it inside
    let secret = dir.join("secret.png");
    save_png(&secret, &picture(32, 32, 77));
    std::fs::write(dir.join("secret.txt"), "TOP SECRET").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&secret, images.join("link.png")).unwrap();
    let server = Running::start(app);
    let addr = server.addr;
    let leaks = |body: &[u8]| {
        let text = String::from_utf8_lossy(body);
        text.contains("TOP SECRET") || text.contains("root:")
    };
    for target in [
        "/../secret.txt",
        "/../../../../etc/passwd",
        "/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/api/tile/../../secret.txt",
        "/api/tile/..%2f..%2fsecret.txt",
        "/api/tile/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/tile/1.png/../../../secret.txt",
        "/api/tile//etc/passwd",
        "/api/tile/1.png%00.txt",
        "//etc/passwd",
        "/index.html/../../secret.txt",
        "/images/secret.txt",
        "/api/search?q=axis+1&k=1&file=../secret.txt",
        "/api/search?like=../../secret.txt",
        "http://localhost/../secret.txt",
    ] {
        let (status, body) = raw_request(addr, target);
        assert!((400..500).contains(&status), "{target}: {status}");
        assert!(!leaks(&body), "{target}");
    }
    // malformed or oversized requests are refused, and the server goes on
    for raw in [
        "GARBAGE\r\n\r\n".to_string(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(20000)),
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 4"), "{text}");
    }
    // a good request through the same server
    let (status, body) = raw_request(addr, "/api/search?q=axis+2&k=1");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // a tampered index naming files outside the folder (by `..`, by absolute path, by a link
    // inside it) serves none of them
    let db = rusqlite::Connection::open(dir.join("index/index.sqlite")).unwrap();
    let ids: Vec<i64> = {
        let mut st = db
            .prepare("SELECT t.id FROM tiles t JOIN files f ON f.id = t.file_id ORDER BY t.id")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let files: Vec<i64> = {
        let mut st = db.prepare("SELECT id FROM files ORDER BY id").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    db.execute(
        "UPDATE files SET path = '../secret.png' WHERE id = ?1",
        [files[0]],
    )
    .unwrap();
    db.execute(
        "UPDATE files SET path = ?2 WHERE id = ?1",
        rusqlite::params![files[1], secret.display().to_string()],
    )
    .unwrap();
    let a_tile = ids[0];
    let b_tile = *ids.last().unwrap();
    for id in [a_tile, b_tile] {
        let (status, body) = raw_request(addr, &format!("/api/tile/{id}.png"));
        assert_eq!(status, 404, "tile {id}: {}", String::from_utf8_lossy(&body));
        assert!(
            String::from_utf8_lossy(&body).contains("not a readable file under the indexed folder")
        );
    }
    db.execute(
        "UPDATE files SET path = 'link.png' WHERE id = ?1",
        [files[0]],
    )
    .unwrap();
    let (status, _) = raw_request(addr, &format!("/api/tile/{a_tile}.png"));
    assert_eq!(status, 404);
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every result of `reply` against an independent read of the index: its tile's file and box,
/// and its score the dot product of `query` with that tile's own vector. Returns the files.
fn check_results(index: &Path, reply: &serve::Reply, query: &[f32]) -> Vec<String> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let mut fresh = Index::open(index).unwrap();
    let v = fresh.vectors().unwrap();
    let tiles = fresh.tiles(&v.ids).unwrap();
    let j = json(reply);
    assert_eq!(j["total"].as_u64(), Some(v.len() as u64));
    let mut files = Vec::new();
    for r in j["results"].as_array().unwrap() {
        let id = r["id"].as_i64().unwrap();
        let t = tiles.iter().find(|t| t.id == id).expect("a live tile");
        assert_eq!(r["file"], t.file.as_str(), "tile {id}");
        assert_eq!(r["x"].as_u64(), Some(t.tile.x as u64), "tile {id}");
        assert_eq!(r["y"].as_u64(), Some(t.tile.y as u64), "tile {id}");
        let dot: f32 = v
            .get(id)
            .unwrap()
            .iter()
            .zip(query)
            .map(|(a, b)| a * b)
            .sum();
        let score = r["score"].as_f64().unwrap();
        assert!(
            (score - dot as f64).abs() < 1e-6,
            "tile {id}: {score} vs {dot}"
        );
        files.push(t.file.clone());
    }
    files
}

#[test]
fn a_served_index_rebuilt_underneath_gives_each_tile_its_own_score() {
    let dir = temp("rebuilt");
    let (app, images) = app(&dir);
    let index = dir.join("index");
    let before = app.handle("GET", "/api/search?q=axis+5&k=20");
    check_results(&index, &before, &unit(5, 0));
    // a build under the running server: a.png (the first 4 tiles) goes, c.png and d.png come,
    // and the vectors are compacted
    std::fs::remove_file(images.join("a.png")).unwrap();
    save_png(&images.join("c.png"), &picture(64, 32, 3));
    save_png(&images.join("d.png"), &picture(32, 32, 4));
    let mut w = Writer::open(&index, &settings(&images), same).unwrap();
    let files = [("b.png", 48, 32), ("c.png", 64, 32), ("d.png", 32, 32)];
    assert_eq!(fill(&mut w, &images, &files, 2), 3);
    assert_eq!(w.compact().unwrap(), 4);
    drop(w);
    let mut seen = Vec::new();
    for n in 0..DIM {
        let reply = app.handle("GET", &format!("/api/search?q=axis+{n}&k=20"));
        seen.extend(check_results(&index, &reply, &unit(n, 0)));
    }
    assert!(seen.iter().any(|f| f == "c.png") && seen.iter().any(|f| f == "d.png"));
    assert!(!seen.iter().any(|f| f == "a.png"));
    let info = json(&app.handle("GET", "/api/info"));
    assert_eq!(
        (info["tiles"].as_u64(), info["searchable"].as_u64()),
        (Some(5), Some(5))
    );
    // more like a new tile: itself first, at score 1
    let mut fresh = Index::open(&index).unwrap();
    let newest = *fresh.vectors().unwrap().ids.iter().max().unwrap();
    let like = json(&app.handle("GET", &format!("/api/search?like={newest}&k=1")));
    assert_eq!(like["results"][0]["id"].as_i64(), Some(newest));
    assert_eq!(like["results"][0]["file"], "d.png");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_row_is_an_error_naming_the_tile_never_a_shift() {
    let dir = temp("missing-row");
    let (app, _images) = app(&dir);
    let db = rusqlite::Connection::open(dir.join("index/index.sqlite")).unwrap();
    // b.png's file row deleted by hand: its tiles keep their vectors
    let b_tiles: Vec<i64> = {
        let mut st = db
            .prepare(
                "SELECT t.id FROM tiles t JOIN files f ON f.id = t.file_id
                 WHERE f.path = 'b.png' ORDER BY t.id",
            )
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    db.pragma_update(None, "foreign_keys", "OFF").unwrap();
    db.execute("DELETE FROM files WHERE path = 'b.png'", [])
        .unwrap();
    // b's tiles lie along axes 4 and 5: the best results
    let reply = app.handle("GET", "/api/search?q=axis+4&k=6");
    let msg = json(&reply)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(reply.status, 500, "{msg}");
    assert!(msg.contains(&format!("tile {} ", b_tiles[0])), "{msg}");
    // as through the library
    let mut index = Index::open(&dir.join("index")).unwrap();
    let e = index
        .read(|view| {
            let v = view.vectors()?;
            harma_search::output::ranked(view, &harma_search::exact::search(&v, &unit(4, 0), 6))
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("has a vector but no tile or file row"), "{e}");
    // a's tiles alone still come back, each with its own row
    let ok = app.handle("GET", "/api/search?q=axis+1&k=2");
    let j = json(&ok);
    assert_eq!(ok.status, 200, "{j}");
    assert!(j["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["file"] == "a.png"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vector_rows_are_bounds_checked_never_wrapped() {
    let dir = temp("rows");
    let (_app, _images) = app(&dir);
    let out = dir.join("index");
    let db = rusqlite::Connection::open(out.join("index.sqlite")).unwrap();
    let first: i64 = db
        .query_row("SELECT MIN(id) FROM tiles", [], |r| r.get(0))
        .unwrap();
    // 2^59 + 1 rows of 8 floats (32 bytes) is byte offset 2^64 + 32: row 1's vector, wrapped
    for (row, says) in [
        ((1i64 << 59) + 1, "outside the 6 committed rows"),
        (-1, "outside the 6 committed rows"),
        (i64::MAX, "outside the 6 committed rows"),
    ] {
        db.execute(
            "UPDATE tiles SET row = ?2 WHERE id = ?1",
            rusqlite::params![first, row],
        )
        .unwrap();
        let e = Index::open(&out)
            .unwrap()
            .vectors()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("tile {first} names vector row {row}")),
            "{e}"
        );
        assert!(e.contains(says), "{e}");
    }
    db.execute("UPDATE tiles SET row = 0 WHERE id = ?1", [first])
        .unwrap();
    assert_eq!(Index::open(&out).unwrap().vectors().unwrap().len(), 6);
    // a committed row count past the file (or past u64 once in bytes)
    for rows in ["7", "18446744073709551615"] {
        db.execute("UPDATE meta SET value = ?1 WHERE key = 'rows'", [rows])
            .unwrap();
        let e = Index::open(&out)
            .unwrap()
            .vectors()
            .unwrap_err()
            .to_string();
        assert!(e.contains("fewer than"), "{rows}: {e}");
        let e = Writer::open(&out, &settings(&dir.join("images")), same)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rebuild the index"), "{rows}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_interrupted_creation_is_redone_by_the_next_writer() {
    let dir = temp("creation");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    save_png(&images.join("a.png"), &picture(64, 64, 1));
    let files = [("a.png", 64, 64)];
    let reference = dir.join("reference");
    let mut w = Writer::open(&reference, &settings(&images), same).unwrap();
    fill(&mut w, &images, &files, 3);
    drop(w);
    // what an older harma left when killed while creating (an index.sqlite without tables),
    // and temp files of a creation killed in this one (pid 0 is never a user process)
    let out = dir.join("index");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("index.sqlite"), b"").unwrap();
    std::fs::write(out.join(".index.sqlite.tmp-0"), b"partial").unwrap();
    std::fs::write(out.join(".index.sqlite.tmp-0-journal"), b"partial").unwrap();
    let e = Index::open(&out).err().unwrap().to_string();
    assert!(
        e.contains("its creation was interrupted") && !e.contains("no such table"),
        "{e}"
    );
    let mut w = Writer::open(&out, &settings(&images), same).unwrap();
    fill(&mut w, &images, &files, 3);
    drop(w);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
        .collect();
    names.sort();
    assert_eq!(names, ["index.sqlite", "vectors-0.f32"]);
    let (mut a, mut b) = (Index::open(&out).unwrap(), Index::open(&reference).unwrap());
    let (va, vb) = (a.vectors().unwrap(), b.vectors().unwrap());
    assert_eq!((va.ids.clone(), va.data), (vb.ids.clone(), vb.data));
    assert_eq!(a.tiles(&va.ids).unwrap(), b.tiles(&vb.ids).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tampered_tile_rows_get_error_replies_and_the_server_keeps_answering() {
    let dir = temp("tampered");
    let (app, images) = app(&dir);
    let server = Running::start(app);
    let addr = server.addr;
    let db = rusqlite::Connection::open(dir.join("index/index.sqlite")).unwrap();
    let ids: Vec<i64> = {
        let mut st = db.prepare("SELECT id FROM tiles ORDER BY id").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let id = ids[0];
    let huge = 1i64 << 40;
    // (column, value, status, what the message says); each request twice, more often than
    // there are threads
    for (column, value, status, says) in [
        ("x", -1, 500, "x=-1"),
        ("w", -5, 500, "w=-5"),
        ("x", i64::MAX, 500, "not one a build writes"),
        ("h", huge, 500, "not one a build writes"),
        ("w", 0, 500, "w=0"),
        ("edge", 9, 500, "edge=9"),
        ("y", 4_000_000_000, 409, "does not fit in a.png"),
        ("w", 65, 409, "does not fit in a.png"),
    ] {
        db.execute(
            &format!("UPDATE tiles SET {column} = ?2 WHERE id = ?1"),
            rusqlite::params![id, value],
        )
        .unwrap();
        for _ in 0..2 {
            let (got, body) = raw_request(addr, &format!("/api/tile/{id}.png"));
            let text = String::from_utf8_lossy(&body);
            assert_eq!(got, status, "{column}={value}: {text}");
            assert!(text.contains(says), "{column}={value}: {text}");
        }
        db.execute(
            "UPDATE tiles SET x = 0, y = 0, w = 32, h = 32, edge = 0 WHERE id = ?1",
            [id],
        )
        .unwrap();
    }
    // a search whose results include the damaged row: an error naming it
    db.execute("UPDATE tiles SET x = -7 WHERE id = ?1", [id])
        .unwrap();
    let (got, body) = raw_request(addr, "/api/search?q=axis+0&k=6");
    assert_eq!(got, 500);
    assert!(String::from_utf8_lossy(&body).contains(&format!("tile {id} of a.png")));
    db.execute("UPDATE tiles SET x = 0 WHERE id = ?1", [id])
        .unwrap();
    // a row naming a file that is gone
    std::fs::remove_file(images.join("b.png")).unwrap();
    let (got, body) = raw_request(addr, &format!("/api/tile/{}.png", ids[5]));
    assert_eq!(got, 404, "{}", String::from_utf8_lossy(&body));
    // every worker still answers
    for _ in 0..6 {
        let (got, _) = raw_request(addr, &format!("/api/tile/{id}.png"));
        assert_eq!(got, 200);
    }
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn only_the_indexed_files_under_the_image_folder_are_read() {
    let dir = temp("root");
    let (app, images) = app(&dir);
    drop(app);
    let out = dir.join("index");
    let embed = || -> serve::TextEmbedder { Box::new(|_: &str| Ok(unit(0, 0))) };
    let set_root = |root: &str| {
        let db = rusqlite::Connection::open(out.join("index.sqlite")).unwrap();
        let mut s = settings(&images);
        s.images = PathBuf::from(root);
        db.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'settings'",
            [serde_json::to_string(&s).unwrap()],
        )
        .unwrap();
    };
    // a recorded root of `/` (or a relative one) is refused; the folder given on the command
    // line is used instead
    set_root("/");
    let e = App::new(Index::open(&out).unwrap(), None, embed())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("the root of the file system"), "{e}");
    let e = App::new(Index::open(&out).unwrap(), Some("/".into()), embed())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("the root of the file system"), "{e}");
    set_root("images");
    let e = App::new(Index::open(&out).unwrap(), None, embed())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not an absolute path"), "{e}");
    let app = App::new(Index::open(&out).unwrap(), Some(images.clone()), embed()).unwrap();
    assert_eq!(app.handle("GET", "/api/tile/1.png").status, 200);

    // a recorded root one folder up, and a files row naming an image there: it is inside the
    // root, but not the file the index recorded (its size and time differ), so it is not read
    let secret = dir.join("secret.png");
    save_png(&secret, &picture(32, 32, 77));
    set_root(dir.canonicalize().unwrap().to_str().unwrap());
    let db = rusqlite::Connection::open(out.join("index.sqlite")).unwrap();
    db.execute(
        "UPDATE files SET path = 'secret.png' WHERE path = 'a.png'",
        [],
    )
    .unwrap();
    let app = App::new(Index::open(&out).unwrap(), None, embed()).unwrap();
    let reply = app.handle("GET", "/api/tile/1.png");
    let msg = json(&reply)["error"].as_str().unwrap().to_string();
    assert_eq!(reply.status, 409, "{msg}");
    assert!(
        msg.contains("secret.png changed since it was indexed"),
        "{msg}"
    );
    // an indexed file changed since: not read either
    db.execute(
        "UPDATE files SET path = 'images/a.png' WHERE path = 'secret.png'",
        [],
    )
    .unwrap();
    let app = App::new(Index::open(&out).unwrap(), None, embed()).unwrap();
    assert_eq!(app.handle("GET", "/api/tile/1.png").status, 200);
    std::thread::sleep(std::time::Duration::from_millis(20));
    save_png(&images.join("a.png"), &picture(64, 64, 9));
    let reply = app.handle("GET", "/api/tile/1.png");
    assert_eq!(reply.status, 409);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A connection to `addr` that gives up reading after 10 s.
fn connect(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One response read from a keep-alive connection: its head (status line and headers) and
/// body (by its Content-Length).
fn read_response(s: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-head: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

/// Send `raw` on a fresh connection, read until the server closes: the whole answer as text.
fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The value of header `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `n` searches one after another, each on a fresh connection: their latencies, sorted.
fn timed_searches(addr: std::net::SocketAddr, n: usize) -> Vec<Duration> {
    let mut took: Vec<Duration> = (0..n)
        .map(|i| {
            let start = Instant::now();
            let (status, body) = raw_request(addr, &format!("/api/search?q=axis+{}&k=5", i % 8));
            let t = start.elapsed();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            t
        })
        .collect();
    took.sort();
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn slow_and_silent_clients_do_not_hold_up_searches() {
    let dir = temp("slow");
    let (app, _) = app(&dir);
    // the command line's defaults: 4 threads, a 10 s header deadline
    let server = Running::start_with(app, ServeConfig::default());
    let addr = server.addr;
    let quiet = timed_searches(addr, 50);

    // 200 clients: half send a request head a byte a second, half nothing at all
    let slow: Vec<std::net::TcpStream> = (0..200).map(|_| connect(addr)).collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let done = done.clone();
        let mut streams: Vec<_> = slow
            .iter()
            .step_by(2)
            .map(|s| s.try_clone().unwrap())
            .collect();
        std::thread::spawn(move || {
            let head = b"GET /api/search?q=axis+1&k=5 HTTP/1.1\r\nHost: localhost\r\n\r\n";
            for &b in head.iter().take(20) {
                for s in &mut streams {
                    let _ = s.write_all(&[b]);
                }
                for _ in 0..10 {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let busy = timed_searches(addr, 50);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    trickle.join().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "50 searches, fresh connections: alone p50 {:.2} ms p99 {:.2} ms; beside 200 slow or \
         silent connections p50 {:.2} ms p99 {:.2} ms",
        ms(percentile(&quiet, 50.0)),
        ms(percentile(&quiet, 99.0)),
        ms(percentile(&busy, 50.0)),
        ms(percentile(&busy, 99.0)),
    );
    // (2-core machine, test profile: p99 2 to 8 ms in either case; a figure, not asserted:
    // speed is `cargo xtask bench`'s). Every search was answered while every slow or silent
    // connection was still open: none waited for the header deadline to clear them
    for s in &slow {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let open = matches!(
            (&*s).read(&mut b),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        assert!(
            open,
            "a slow connection was closed before the searches were answered"
        );
    }
    drop(slow);
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_header_deadline_closes_slow_silent_and_idle_connections() {
    let dir = temp("deadline");
    let (app, _) = app(&dir);
    let deadline = Duration::from_millis(500);
    let cfg = ServeConfig {
        header_timeout: deadline,
        ..ServeConfig::default()
    };
    let server = Running::start_with(app, cfg);
    let addr = server.addr;
    let closed_within = |s: &mut std::net::TcpStream, start: Instant| {
        let mut buf = Vec::new();
        // end of stream or a reset, either way closed; a read timeout (10 s) fails
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        let t = start.elapsed();
        assert!(t >= deadline - Duration::from_millis(50), "{t:?}");
        assert!(t < deadline * 4, "{t:?}");
        buf
    };
    // a head started, never finished; one never started
    let start = Instant::now();
    let mut partial = connect(addr);
    partial
        .write_all(b"GET /api/info HTTP/1.1\r\nHost: loc")
        .unwrap();
    let mut silent = connect(addr);
    let got = closed_within(&mut partial, start);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    closed_within(&mut silent, start);

    // keep-alive: two requests on one connection, then idle until the deadline
    let mut s = connect(addr);
    for _ in 0..2 {
        s.write_all(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("\"tiles\""));
    }
    closed_within(&mut s, Instant::now());
    // and the server still answers
    assert_eq!(raw_request(addr, "/api/info").0, 200);
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn requests_for_other_hosts_are_refused() {
    let dir = temp("host");
    let (app, _) = app(&dir);
    let cfg = ServeConfig {
        hosts: vec!["search.lan".into()],
        ..ServeConfig::default()
    };
    let server = Running::start_with(app, cfg);
    let addr = server.addr;
    let get = |host: &str, target: &str| {
        exchange(
            addr,
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let port = addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("search.lan:{port}"),
        "localhost:9000".to_string(), // through a tunnel that changed the port
    ] {
        let text = get(&host, "/api/info");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{host}: {text}");
    }
    // a DNS-rebinding page asks under its own name
    for (host, target) in [
        (format!("evil.example:{port}"), "/api/info".to_string()),
        ("evil.example".to_string(), "/".to_string()),
        (
            format!("localhost:{port}"),
            format!("http://evil.example:{port}/api/info"),
        ),
    ] {
        let text = get(&host, &target);
        assert!(
            text.starts_with("HTTP/1.1 421 Misdirected Request\r\n"),
            "{host} {target}: {text}"
        );
        assert!(text.contains("{\"error\":\"this server does not answer to the host `evil.example"));
    }
    let text = exchange(addr, b"GET /api/info HTTP/1.0\r\n\r\n");
    assert!(text.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("no Host header"), "{text}");
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_reply_carries_the_security_headers() {
    let dir = temp("headers");
    let (app, _) = app(&dir);
    let server = Running::start(app);
    let addr = server.addr;
    let mut s = connect(addr);
    for (target, status) in [
        ("/", 200),
        ("/api/info", 200),
        ("/api/search?q=axis+1&k=2", 200),
        ("/api/tile/1.png", 200),
        ("/nowhere", 404),
    ] {
        write!(s, "GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let (head, _) = read_response(&mut s);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{target}: {head}"
        );
        let csp = header(&head, "content-security-policy").unwrap_or_default();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'sha256-"),
            "{target}: {head}"
        );
        assert!(
            csp.contains("connect-src 'self'") && csp.contains("img-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(
            header(&head, "x-content-type-options"),
            Some("nosniff"),
            "{head}"
        );
        assert_eq!(header(&head, "cache-control"), Some("no-store"), "{head}");
    }
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn heads_over_the_limit_and_bodies_are_refused_with_their_own_status() {
    let dir = temp("limits");
    let (app, _) = app(&dir);
    let server = Running::start(app);
    let addr = server.addr;
    // a head of exactly `len` bytes (with its blank line)
    let head = |len: usize| {
        let start = "GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: ";
        let pad = len - start.len() - 4;
        format!("{start}{}\r\n\r\n", "a".repeat(pad))
    };
    let limit = ServeConfig::default().max_head;
    assert_eq!(limit, 16 * 1024);
    let text = exchange(addr, head(limit).as_bytes());
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    for len in [limit + 1, 17_000] {
        let text = exchange(addr, head(len).as_bytes());
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{len}: {text}"
        );
    }
    let text = exchange(
        addr,
        b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert!(
        text.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{text}"
    );
    assert!(text.contains("carries no body"), "{text}");
    assert_eq!(raw_request(addr, "/api/info").0, 200);
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn log_lines_escape_what_the_client_sent() {
    let dir = temp("log");
    let (app, _) = app(&dir);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let cfg = ServeConfig {
        log: Some({
            let lines = lines.clone();
            Arc::new(move |l: &str| lines.lock().unwrap().push(l.to_string()))
        }),
        ..ServeConfig::default()
    };
    let server = Running::start_with(app, cfg);
    let addr = server.addr;
    let sent: [&[u8]; 4] = [
        b"GET /api/search?q=%1b%5b31m%0a&k=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /a\x1b[31m HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /a\nGET /forged 200 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /caf\xc3\xa9\xe2\x80\xae HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ];
    for raw in sent {
        let text = exchange(addr, raw);
        assert!(text.starts_with("HTTP/1.1 "), "{text}");
    }
    // connection errors are logged after the connection closed: wait for all lines
    let start = Instant::now();
    while lines.lock().unwrap().len() < sent.len() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let lines = lines.lock().unwrap().clone();
    assert_eq!(lines.len(), sent.len(), "{lines:#?}");
    let logged = |start: &str| lines.iter().any(|l| l.starts_with(start));
    assert!(
        logged("GET /api/search?q=%1b%5b31m%0a&k=1 500 "),
        "{lines:#?}"
    );
    // non-ASCII passes the parser: a right-to-left override is escaped
    assert!(logged("GET /caf\u{e9}\\u{202e} 404 "), "{lines:#?}");
    for l in &lines {
        assert!(
            !l.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{l:?}"
        );
    }
    assert_eq!(
        serve::escape_log("GET /a\x1b[31m\nforged"),
        "GET /a\\u{1b}[31m\\u{a}forged"
    );
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn beyond_the_connection_cap_clients_wait_for_a_slot() {
    let dir = temp("cap");
    let (app, _) = app(&dir);
    let deadline = Duration::from_millis(500);
    let cfg = ServeConfig {
        max_connections: 2,
        header_timeout: deadline,
        ..ServeConfig::default()
    };
    let server = Running::start_with(app, cfg);
    let addr = server.addr;
    // two silent clients hold both slots until their header deadline
    let start = Instant::now();
    let silent: Vec<_> = (0..2).map(|_| connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let (status, _) = raw_request(addr, "/api/search?q=axis+1&k=5");
    let t = start.elapsed();
    assert_eq!(status, 200);
    assert!(
        t >= deadline - Duration::from_millis(50) && t < deadline * 4,
        "{t:?}"
    );
    drop(silent);
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_late_answer_is_a_503_and_a_panic_a_500_and_the_server_goes_on() {
    let dir = temp("late");
    let (app, _) = app(&dir);
    drop(app);
    let embed: serve::TextEmbedder = Box::new(|q: &str| match q {
        "slow" => {
            std::thread::sleep(Duration::from_millis(2500));
            Ok(unit(0, 0))
        }
        "boom" => panic!("a bug in the embedder"),
        _ => Ok(unit(1, 0)),
    });
    let app = App::new(Index::open(&dir.join("index")).unwrap(), None, embed).unwrap();
    let cfg = ServeConfig {
        threads: 2,
        // long enough for a panic to print its backtrace
        request_timeout: Duration::from_secs(1),
        ..ServeConfig::default()
    };
    let server = Running::start_with(app, cfg);
    let addr = server.addr;
    let (status, body) = raw_request(addr, "/api/search?q=boom");
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("(a bug)"));
    let (status, body) = raw_request(addr, "/api/search?q=slow");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("no answer within 1 s"));
    for _ in 0..4 {
        assert_eq!(raw_request(addr, "/api/search?q=fine").0, 200);
    }
    server.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
