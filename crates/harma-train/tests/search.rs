//! `harma index build`, `harma search` and `harma serve` end to end with small random models:
//! tiles and their GeoTIFF boxes, scores against `harma embed`'s embeddings, incremental
//! rebuilds, an interrupted build that resumes to the same index, refusing another model,
//! `--bands`, and the web API through the real server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use harma_clip::checkpoint::{write_random_backbone, RandomInit};
use harma_clip::{Activation, ClipConfig};
use harma_data::rng::Rng;
use serde_json::Value;
use tiff::encoder::{colortype, TiffEncoder};

fn harma(args: &[&str]) -> Output {
    harma_env(args, &[])
}

fn harma_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_harma"));
    c.args(args).env("RAYON_NUM_THREADS", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run harma")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "harma failed:\n{err}");
    err
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "harma should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-search-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny random CLIP (64-pixel input, 32-d embeddings) as safetensors.
fn write_model(path: &Path, seed: u64) {
    let cfg = ClipConfig::tiny(Activation::QuickGelu);
    let mut rng = Rng::new(seed);
    write_random_backbone(&cfg, RandomInit::FanIn, &mut || rng.uniform(), path).unwrap();
}

/// An RGB scene (pixel values from a seed) as a PNG.
fn write_png(path: &Path, w: u32, h: u32, seed: u64) {
    let mut rng = Rng::new(seed);
    let scene = harma_train::synth::Scene::random(&mut rng);
    let img = scene.render(w.max(h) as usize, &mut rng);
    let cut = harma_raster::crop(
        &img,
        &harma_raster::Tile {
            x: 0,
            y: 0,
            w: w as usize,
            h: h as usize,
            edge: 0,
        },
    );
    image::RgbImage::from_raw(w, h, cut.data)
        .unwrap()
        .save(path)
        .unwrap();
}

/// A 300 x 200 GeoTIFF in UTM 33N (EPSG:32633), 10 m pixels, upper-left corner at
/// (500000, 4000000).
fn write_geotiff(path: &Path) {
    let mut rng = Rng::new(11);
    let img = harma_train::synth::Scene::random(&mut rng).render(300, &mut rng);
    let img = harma_raster::crop(
        &img,
        &harma_raster::Tile {
            x: 0,
            y: 0,
            w: 300,
            h: 200,
            edge: 0,
        },
    );
    let geo = harma_raster::GeoRef {
        epsg: Some(32633),
        x0: 500000.0,
        dx: 10.0,
        y0: 4000000.0,
        dy: -10.0,
    };
    harma_raster::write_geotiff(path, &img, &geo).unwrap();
}

struct Setup {
    dir: PathBuf,
    images: PathBuf,
    model: PathBuf,
    other: PathBuf,
}

fn setup(name: &str) -> Setup {
    let dir = temp(name);
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("sub/deeper")).unwrap();
    write_geotiff(&images.join("geo.tif"));
    write_png(&images.join("sub/small.png"), 100, 80, 1);
    write_png(&images.join("sub/deeper/wide.png"), 200, 128, 2);
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let model = dir.join("model.safetensors");
    write_model(&model, 1);
    let other = dir.join("other.safetensors");
    write_model(&other, 2);
    Setup {
        dir,
        images,
        model,
        other,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn build(st: &Setup, out: &Path, extra: &[&str]) -> Output {
    build_env(st, out, extra, &[])
}

fn build_env(st: &Setup, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "index",
        "build",
        "--model",
        s(&st.model),
        "--arch",
        "tiny-quickgelu",
        "--images",
        s(&st.images),
        "--out",
        s(out),
        "--tile",
        "128",
    ];
    args.extend_from_slice(extra);
    harma_env(&args, env)
}

/// The feature of geo.tif's tile at pixel 0,0.
fn top_left_geo_tile(features: &[Value]) -> &Value {
    features
        .iter()
        .find(|f| {
            f["properties"]["file"] == "geo.tif"
                && f["properties"]["x"] == 0
                && f["properties"]["y"] == 0
        })
        .unwrap()
}

fn search_json(index: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["search", s(index), "--json", "-k", "100"];
    args.extend_from_slice(extra);
    let o = harma(&args);
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn results(v: &Value) -> Vec<Value> {
    v["results"].as_array().unwrap().clone()
}

/// (file, x, y) -> score of every result.
fn scores(v: &Value) -> Vec<(String, u64, u64, f64)> {
    let mut out: Vec<_> = results(v)
        .iter()
        .map(|r| {
            (
                r["file"].as_str().unwrap().to_string(),
                r["x"].as_u64().unwrap(),
                r["y"].as_u64().unwrap(),
                r["score"].as_f64().unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    out
}

#[test]
fn index_search_and_geojson_with_georeferenced_tiles() {
    let st = setup("main");
    let index = st.dir.join("index");
    let err = ok(&build(&st, &index, &["--batch-size", "4"]));
    assert!(err.contains("3 new"), "{err}");
    // geo.tif 300x200 at 128: 3 x 2 tiles; small.png 100x80: 1; wide.png 200x128: 2
    assert!(err.contains("embedded 9 tiles from 3 files"), "{err}");

    let v = search_json(&index, &["a river next to farmland"]);
    let r = results(&v);
    assert_eq!(r.len(), 9);
    let ranks: Vec<u64> = r.iter().map(|x| x["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, (1..=9).collect::<Vec<_>>());
    assert!(r
        .windows(2)
        .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));
    let find = |file: &str, x: u64, y: u64| {
        r.iter()
            .find(|t| t["file"] == file && t["x"] == x && t["y"] == y)
            .unwrap_or_else(|| panic!("no tile {file} {x},{y}"))
            .clone()
    };
    // tile (0, 0) of the GeoTIFF and its last tile, against boxes computed by hand
    let first = find("geo.tif", 0, 0);
    assert_eq!(first["epsg"], 32633);
    assert_eq!(
        first["bbox"],
        serde_json::json!([500000.0, 3998720.0, 501280.0, 4000000.0])
    );
    let last = find("geo.tif", 172, 72);
    assert_eq!(
        (last["w"].as_u64(), last["edge"].as_u64()),
        (Some(128), Some(3))
    );
    assert_eq!(
        last["bbox"],
        serde_json::json!([501720.0, 3998000.0, 503000.0, 3999280.0])
    );
    // a PNG: pixel box only; smaller than a tile: the whole image
    let small = find("sub/small.png", 0, 0);
    assert!(small["bbox"].is_null() && small["epsg"].is_null());
    assert_eq!(
        (small["w"].as_u64(), small["h"].as_u64()),
        (Some(100), Some(80))
    );
    let edge = find("sub/deeper/wide.png", 72, 0);
    assert_eq!(edge["edge"], 1);

    // the scores are what `harma embed` gives for the same picture and text: the small PNG is
    // one tile, the whole image
    let embeds = st.dir.join("embeds.safetensors");
    let caps = st.dir.join("caps.txt");
    std::fs::write(&caps, "a river next to farmland\n").unwrap();
    let solo = st.dir.join("solo");
    std::fs::create_dir_all(&solo).unwrap();
    std::fs::copy(st.images.join("sub/small.png"), solo.join("small.png")).unwrap();
    ok(&harma(&[
        "embed",
        "--model",
        s(&st.model),
        "--arch",
        "tiny-quickgelu",
        "--images",
        s(&solo),
        "--captions",
        s(&caps),
        "--out",
        s(&embeds),
    ]));
    let bytes = std::fs::read(&embeds).unwrap();
    let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let vec = |name: &str| -> Vec<f32> {
        t.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (img, txt) = (vec("image_embeds"), vec("text_embeds"));
    let dot: f32 = img.iter().zip(&txt).map(|(a, b)| a * b).sum();
    let got = small["score"].as_f64().unwrap();
    assert!((got - dot as f64).abs() < 1e-5, "{got} vs {dot}");

    // image to image: the small PNG finds its own tile first, score 1
    let by_image = search_json(&index, &["--image", s(&solo.join("small.png"))]);
    let top = &results(&by_image)[0];
    assert_eq!(top["file"], "sub/small.png");
    assert!((top["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);

    // GeoJSON, the native form: a FeatureCollection in EPSG:32633 with the boxes as polygons
    let o = harma(&[
        "search",
        s(&index),
        "harbour",
        "--geojson",
        "--geojson-native",
        "-k",
        "9",
    ]);
    ok(&o);
    let fc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(fc["type"], "FeatureCollection");
    assert_eq!(fc["crs"]["properties"]["name"], "EPSG:32633");
    let features = fc["features"].as_array().unwrap();
    assert_eq!(features.len(), 9);
    let geo: Vec<&Value> = features
        .iter()
        .filter(|f| f["properties"]["file"] == "geo.tif")
        .collect();
    assert_eq!(geo.len(), 6);
    assert!(geo.iter().all(|f| f["geometry"]["type"] == "Polygon"));
    let corner = top_left_geo_tile(features);
    assert_eq!(
        corner["geometry"]["coordinates"][0][0],
        serde_json::json!([500000.0, 3998720.0])
    );
    // RFC 7946 (the default): the same corner in WGS84 degrees, the native box a property
    let o = harma(&["search", s(&index), "harbour", "--geojson", "-k", "9"]);
    ok(&o);
    let fc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(fc.get("crs").is_none());
    let corner = top_left_geo_tile(fc["features"].as_array().unwrap());
    let at = &corner["geometry"]["coordinates"][0][0];
    // UTM 33N easting 500000 is the zone's central meridian, 15 degrees east
    assert!((at[0].as_f64().unwrap() - 15.0).abs() < 1e-9, "{at}");
    assert!((36.0..36.2).contains(&at[1].as_f64().unwrap()), "{at}");
    assert_eq!(corner["properties"]["epsg"], 32633);
    assert_eq!(corner["properties"]["bbox"][0], 500000.0);
    assert!(features
        .iter()
        .filter(|f| f["properties"]["file"] != "geo.tif")
        .all(|f| f["geometry"].is_null()));
    // the plain table
    let o = harma(&["search", s(&index), "harbour", "-k", "3"]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");

    // another model is refused, by search and by build
    let e = failed(&harma(&["search", s(&index), "x", "--model", s(&st.other)]));
    assert!(
        e.contains("the index was built with model") && e.contains("other.safetensors"),
        "{e}"
    );
    let e = failed(&harma(&[
        "index",
        "build",
        "--model",
        s(&st.other),
        "--arch",
        "tiny-quickgelu",
        "--images",
        s(&st.images),
        "--out",
        s(&index),
        "--tile",
        "128",
    ]));
    assert!(e.contains("the index was built with model"), "{e}");
    // as is another architecture, and other tiling
    let e = failed(&harma(&["search", s(&index), "x", "--arch", "tiny"]));
    assert!(e.contains("the index was built with"), "{e}");
    let e = failed(&build(&st, &index, &["--stride", "64"]));
    assert!(
        e.contains("--tile 128 --stride 128") && e.contains("--stride 64"),
        "{e}"
    );
    // the same model copied elsewhere is the same model
    let copy = st.dir.join("copy.safetensors");
    std::fs::copy(&st.model, &copy).unwrap();
    ok(&harma(&["search", s(&index), "x", "--model", s(&copy)]));
    // the index's model file replaced by other weights: refused too
    std::fs::copy(&st.other, &st.model).unwrap();
    let e = failed(&harma(&["search", s(&index), "x"]));
    assert!(e.contains("the index was built with model"), "{e}");
    std::fs::remove_dir_all(&st.dir).unwrap();
}

#[test]
fn rebuilds_are_incremental_and_interrupted_builds_resume() {
    let st = setup("incr");
    let clean = st.dir.join("clean");
    ok(&build(&st, &clean, &["--batch-size", "2"]));
    let want = scores(&search_json(&clean, &["boats"]));
    assert_eq!(want.len(), 9);

    // a build that crashes between writing a batch's vectors and committing them, after two
    // committed batches of 2 tiles
    let index = st.dir.join("index");
    let o = build_env(
        &st,
        &index,
        &["--batch-size", "2"],
        &[("HARMA_INDEX_CRASH_AFTER", "2")],
    );
    failed(&o);
    // the index opens and holds the two committed batches only
    let part = search_json(&index, &["boats"]);
    assert_eq!(part["total"], 4);
    // the rerun finishes it: only the missing tiles are embedded, and the index equals the
    // uninterrupted one
    let err = ok(&build(&st, &index, &["--batch-size", "2"]));
    assert!(err.contains("embedded 5 tiles"), "{err}");
    let got = scores(&search_json(&index, &["boats"]));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.0, g.1, g.2), (&w.0, w.1, w.2));
        assert!((g.3 - w.3).abs() < 1e-5, "{g:?} vs {w:?}");
    }

    // nothing changed: nothing to do
    let err = ok(&build(&st, &index, &[]));
    assert!(
        err.contains("0 new, 0 changed, 0 unfinished, 3 unchanged; 0 gone"),
        "{err}"
    );
    assert!(err.contains("embedded 0 tiles"), "{err}");
    // one file changes (now two tiles), one is new, one goes
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_png(&st.images.join("sub/small.png"), 250, 100, 5);
    write_png(&st.images.join("sub/new.png"), 64, 64, 6);
    std::fs::remove_file(st.images.join("sub/deeper/wide.png")).unwrap();
    let err = ok(&build(&st, &index, &[]));
    assert!(
        err.contains("1 new, 1 changed, 0 unfinished, 1 unchanged; 1 gone"),
        "{err}"
    );
    assert!(err.contains("embedded 3 tiles from 2 files"), "{err}");
    let v = search_json(&index, &["boats"]);
    let got = scores(&v);
    let files: Vec<(&str, u64)> = got.iter().map(|g| (g.0.as_str(), g.1)).collect();
    assert_eq!(
        files,
        vec![
            ("geo.tif", 0),
            ("geo.tif", 0),
            ("geo.tif", 128),
            ("geo.tif", 128),
            ("geo.tif", 172),
            ("geo.tif", 172),
            ("sub/new.png", 0),
            ("sub/small.png", 0),
            ("sub/small.png", 122),
        ]
    );
    // the unchanged file's tiles are untouched
    for g in got.iter().filter(|g| g.0 == "geo.tif") {
        let w = want
            .iter()
            .find(|w| (&w.0, w.1, w.2) == (&g.0, g.1, g.2))
            .unwrap();
        assert!((g.3 - w.3).abs() < 1e-5);
    }
    std::fs::remove_dir_all(&st.dir).unwrap();
}

#[test]
fn an_index_creation_killed_at_any_step_is_redone_by_the_rerun() {
    let st = setup("create");
    let clean = st.dir.join("clean");
    ok(&build(&st, &clean, &[]));
    let want = scores(&search_json(&clean, &["boats"]));
    // a kill -9 after each step of creating the index (temp file, schema, commit, link,
    // temp removed, WAL, vector file); then `index info` and `search` fail with a message
    // or answer, and the rerun succeeds and gives the uninterrupted index
    for step in 1..=harma_search::store::CREATE_STEPS {
        let index = st.dir.join(format!("index-{step}"));
        let step_s = step.to_string();
        let e = failed(&build_env(
            &st,
            &index,
            &[],
            &[("HARMA_INDEX_CRASH_CREATING", &step_s)],
        ));
        assert!(e.contains(&format!("after step {step} of creating")), "{e}");
        for o in [
            harma(&["index", "info", s(&index)]),
            harma(&["search", s(&index), "boats"]),
        ] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !err.contains("no such table") && !err.contains("panicked"),
                "step {step}: {err}"
            );
        }
        let err = ok(&build(&st, &index, &[]));
        assert!(err.contains("embedded 9 tiles"), "step {step}: {err}");
        let got = scores(&search_json(&index, &["boats"]));
        assert_eq!(got.len(), want.len(), "step {step}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, g.1, g.2), (&w.0, w.1, w.2), "step {step}");
            assert!((g.3 - w.3).abs() < 1e-5, "step {step}: {g:?} vs {w:?}");
        }
        let left: Vec<String> = std::fs::read_dir(&index)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "step {step}: {left:?}");
    }
    // what an older harma left: an index.sqlite without tables
    let old = st.dir.join("index-old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("index.sqlite"), b"").unwrap();
    let e = failed(&harma(&["index", "info", s(&old)]));
    assert!(
        e.contains("its creation was interrupted") && e.contains("rerun"),
        "{e}"
    );
    ok(&build(&st, &old, &[]));
    assert_eq!(scores(&search_json(&old, &["boats"])).len(), 9);
    std::fs::remove_dir_all(&st.dir).unwrap();
}

/// An HTTP GET to the server: status and body.
fn get(addr: &str, target: &str) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // HTTP/1.0: the body comes whole, never chunked
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let status = String::from_utf8_lossy(&buf[..12])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (status, buf[at + 4..].to_vec())
}

#[test]
fn serve_answers_text_queries_with_the_model() {
    use std::io::BufRead;
    let st = setup("serve");
    let index = st.dir.join("index");
    ok(&build(&st, &index, &[]));
    let want = scores(&search_json(&index, &["a bridge over a river"]));
    /// Stops the server however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Server(
        Command::new(env!("CARGO_BIN_EXE_harma"))
            .args([
                "serve",
                s(&index),
                "--addr",
                "127.0.0.1:0",
                "--threads",
                "2",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(rest) = line.split("on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let (status, body) = get(&addr, "/api/search?q=a+bridge+over+a+river&k=9");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let got = scores(&v);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.0, g.1, g.2), (&w.0, w.1, w.2));
        assert!((g.3 - w.3).abs() < 1e-5);
    }
    let id = v["results"][0]["id"].as_i64().unwrap();
    let (status, png) = get(&addr, &format!("/api/tile/{id}.png"));
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG"));
    let (status, body) = get(&addr, "/api/search?k=3");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = get(&addr, "/");
    assert_eq!(status, 200);
    // the index rebuilt under the running server (a file gone, one new, the vectors
    // compacted): the next answers are the new index's, each tile with its own score
    std::fs::remove_file(st.images.join("geo.tif")).unwrap();
    write_png(&st.images.join("sub/new.png"), 64, 64, 6);
    let err = ok(&build(&st, &index, &[]));
    assert!(err.contains("compacted"), "{err}");
    let want = scores(&search_json(&index, &["a bridge over a river"]));
    assert_eq!(want.len(), 4);
    let (status, body) = get(&addr, "/api/search?q=a+bridge+over+a+river&k=9");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["total"], 4);
    let got = scores(&v);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.0, g.1, g.2), (&w.0, w.1, w.2));
        assert!((g.3 - w.3).abs() < 1e-5, "{g:?} vs {w:?}");
    }
    let new = results(&v)
        .into_iter()
        .find(|r| r["file"] == "sub/new.png")
        .unwrap();
    let (status, png) = get(&addr, &format!("/api/tile/{}.png", new["id"]));
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG"));
    drop(child);
    std::fs::remove_dir_all(&st.dir).unwrap();
}

#[test]
fn embed_reads_the_chosen_bands() {
    // a 4-band 8-bit TIFF (R, G, B, NIR) read as NIR,R,G equals a PNG holding those bands
    let dir = temp("bands");
    let model = dir.join("model.safetensors");
    write_model(&model, 1);
    let (tif_dir, png_dir) = (dir.join("tif"), dir.join("png"));
    std::fs::create_dir_all(&tif_dir).unwrap();
    std::fs::create_dir_all(&png_dir).unwrap();
    let (w, h) = (40u32, 30u32);
    let px = |x: u32, y: u32| [(x * 6) as u8, (y * 8) as u8, 99u8, ((x + y) * 3) as u8];
    let rgba: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| px(x, y)))
        .collect();
    TiffEncoder::new(std::fs::File::create(tif_dir.join("a.tif")).unwrap())
        .unwrap()
        .write_image::<colortype::RGBA8>(w, h, &rgba)
        .unwrap();
    let picked: Vec<u8> = rgba.chunks(4).flat_map(|p| [p[3], p[0], p[1]]).collect();
    image::RgbImage::from_raw(w, h, picked)
        .unwrap()
        .save(png_dir.join("a.png"))
        .unwrap();
    let embed = |images: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "embed",
            "--model",
            s(&model),
            "--arch",
            "tiny-quickgelu",
            "--images",
            s(images),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        ok(&harma(&args));
        let bytes = std::fs::read(out).unwrap();
        let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        t.tensor("image_embeds").unwrap().data().to_vec()
    };
    let a = embed(&tif_dir, &dir.join("a.safetensors"), &["--bands", "4,1,2"]);
    let b = embed(&png_dir, &dir.join("b.safetensors"), &[]);
    assert_eq!(a, b);
    let e = failed(&harma(&[
        "embed",
        "--model",
        s(&model),
        "--arch",
        "tiny-quickgelu",
        "--images",
        s(&tif_dir),
        "--out",
        s(&dir.join("c.safetensors")),
        "--bands",
        "5,1,2",
    ]));
    assert!(e.contains("a.tif") && e.contains("band 5"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `index build --shard I/N`: the shards of a folder partition its files, each shard is an
/// index of its own, and the shards' results merged by score are the whole index's.
#[test]
fn shards_partition_the_folder_and_merge_to_the_whole_index() {
    let st = setup("shards");
    std::fs::create_dir_all(st.images.join("extra")).unwrap();
    for i in 0..10 {
        write_png(
            &st.images.join(format!("extra/scene-{i}.png")),
            96,
            96,
            10 + i,
        );
    }
    let whole = st.dir.join("whole");
    ok(&build(&st, &whole, &[]));
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| {
            let out = st.dir.join(format!("shard-{i}"));
            ok(&build(&st, &out, &["--shard", &format!("{i}/2")]));
            out
        })
        .collect();
    let hits = |index: &Path| -> Vec<Value> {
        search_json(index, &["a harbour with boats"])["results"]
            .as_array()
            .unwrap()
            .clone()
    };
    let key = |h: &Value| {
        (
            h["file"].as_str().unwrap().to_string(),
            h["x"].clone(),
            h["y"].clone(),
        )
    };
    let files = |hs: &[Value]| -> std::collections::BTreeSet<String> {
        hs.iter()
            .map(|h| h["file"].as_str().unwrap().to_string())
            .collect()
    };
    let all = hits(&whole);
    let parts: Vec<Vec<Value>> = shards.iter().map(|s| hits(s)).collect();
    // a partition: no file in both, none missing, neither shard empty
    let (a, b) = (files(&parts[0]), files(&parts[1]));
    assert!(!a.is_empty() && !b.is_empty(), "{a:?} {b:?}");
    assert!(a.is_disjoint(&b), "{a:?} {b:?}");
    assert_eq!(
        a.union(&b)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        files(&all)
    );
    // merged by score, the shards give the whole index's ranking and scores
    let mut merged: Vec<Value> = parts.concat();
    merged.sort_by(|x, y| {
        y["score"]
            .as_f64()
            .unwrap()
            .total_cmp(&x["score"].as_f64().unwrap())
    });
    assert_eq!(merged.len(), all.len());
    for (m, w) in merged.iter().zip(&all).take(10) {
        assert_eq!(key(m), key(w));
        assert!((m["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs() < 1e-6);
    }
    // a shard is an index of its own: another share of the folder is refused there
    let e = failed(&build(&st, &shards[0], &["--shard", "1/2"]));
    assert!(
        e.contains("--shard 0/2") && e.contains("--shard 1/2"),
        "{e}"
    );
    let e = failed(&build(&st, &whole, &["--shard", "0/2"]));
    assert!(e.contains("all files") && e.contains("new --out"), "{e}");
    let e = failed(&build(&st, &st.dir.join("bad"), &["--shard", "2/2"]));
    assert!(e.contains("0 <= I < N"), "{e}");
    std::fs::remove_dir_all(&st.dir).unwrap();
}
