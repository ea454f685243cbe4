//! `harma serve`: a web page (search box, a grid of result tiles with score, file and
//! coordinates; a click asks for more like that tile) and the JSON API behind it:
//!
//! - `GET /api/search?q=TEXT&k=20`: the k tiles nearest to the text (k from 1 to 500);
//! - `GET /api/search?like=ID&k=20`: the k tiles nearest to tile ID ("more like this");
//! - `GET /api/tile/ID.png`: tile ID cut from its source image, at most 256 pixels a side;
//! - `GET /api/info`: the index's size and settings.
//!
//! The page is compiled into the binary; nothing is fetched from elsewhere. Requests name
//! tiles by number only, never by path: a tile's file comes from the index and is opened only
//! if, links resolved, it lies inside the indexed folder. Bad requests get a 4xx status and a
//! JSON `{"error": ...}` that says what was wrong.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use harma_data::raster::{crop, load_raster, Bands};
use harma_data::{resize_bicubic, RgbImage};
use serde_json::json;

use crate::exact;
use crate::output::ranked;
use crate::store::{Index, Vectors};
use crate::walk::resolve_inside;
use crate::{Error, Result};

/// Embeds a text query: the model, from the caller (an error is a message for the user).
pub type TextEmbedder = Box<dyn Fn(&str) -> std::result::Result<Vec<f32>, String> + Send + Sync>;

/// The largest k a request may ask for.
pub const MAX_K: usize = 500;
/// The longest query accepted, in bytes (CLIP reads 77 tokens; this leaves room for any text
/// that fits them).
pub const MAX_QUERY: usize = 2000;
/// Thumbnails are at most this many pixels a side.
pub const THUMB: usize = 256;
/// Decoded source images kept for cutting thumbnails: a page of results often comes from a
/// few large rasters.
const CACHE_IMAGES: usize = 4;

const PAGE: &str = include_str!("page.html");

/// A response: status, content type, body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(v).expect("JSON serialises"),
        }
    }

    fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply::json(status, &json!({ "error": msg.into() }))
    }
}

/// The server's state: the index, its vectors in memory, the text embedder.
pub struct App {
    index: Mutex<Index>,
    vectors: Vectors,
    root: PathBuf,
    bands: Option<Bands>,
    embed: TextEmbedder,
    model: String,
    cache: Mutex<VecDeque<(String, Arc<RgbImage>)>>,
}

impl App {
    /// Load the index's vectors and get ready to answer. `images` overrides the indexed folder
    /// (an archive that moved).
    pub fn new(mut index: Index, images: Option<PathBuf>, embed: TextEmbedder) -> Result<App> {
        let vectors = index.vectors()?;
        let root = images.unwrap_or_else(|| index.settings.images.clone());
        let root = root.canonicalize().map_err(|e| Error::io(&root, e))?;
        let bands = match &index.settings.bands {
            Some(b) => Some(b.parse::<Bands>().map_err(Error::Other)?),
            None => None,
        };
        let model = index
            .settings
            .model
            .path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        Ok(App {
            index: Mutex::new(index),
            vectors,
            root,
            bands,
            embed,
            model,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// Answer one request (`url`: path and query, as sent).
    pub fn handle(&self, method: &str, url: &str) -> Reply {
        if method != "GET" {
            return Reply::error(405, format!("{method} is not supported: use GET"));
        }
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        match path {
            "/" | "/index.html" => Reply {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: PAGE.as_bytes().to_vec(),
            },
            "/api/search" => self.search(query).unwrap_or_else(|e| e),
            "/api/info" => self.info(),
            _ => match path.strip_prefix("/api/tile/") {
                Some(rest) => self.tile(rest).unwrap_or_else(|e| e),
                None => Reply::error(
                    404,
                    format!("no page {path}: the page is /, the API /api/search, /api/tile/ID.png, /api/info"),
                ),
            },
        }
    }

    fn info(&self) -> Reply {
        let index = self.index.lock().expect("index lock");
        let s = &index.settings;
        match index.counts() {
            Ok((files, unreadable, tiles)) => Reply::json(
                200,
                &json!({
                    "files": files, "unreadable_files": unreadable, "tiles": tiles,
                    "searchable": self.vectors.len(),
                    "tile": s.tile, "stride": s.stride, "bands": s.bands,
                    "model": self.model, "arch": s.arch, "dim": s.dim,
                }),
            ),
            Err(e) => Reply::error(500, e.to_string()),
        }
    }

    fn search(&self, query: &str) -> std::result::Result<Reply, Reply> {
        let start = std::time::Instant::now();
        let (mut q, mut like, mut k) = (None, None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "q" => &mut q,
                "like" => &mut like,
                "k" => &mut k,
                other => {
                    return Err(Reply::error(
                        400,
                        format!("unknown parameter `{other}`: use q, like and k"),
                    ))
                }
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(Reply::error(400, format!("parameter `{key}` given twice")));
            }
        }
        let k = match k {
            None => 20,
            Some(k) => match k.parse::<usize>() {
                Ok(k) if (1..=MAX_K).contains(&k) => k,
                _ => {
                    return Err(Reply::error(
                        400,
                        format!("k={k}: give a whole number from 1 to {MAX_K}"),
                    ))
                }
            },
        };
        let (vector, q_json, like_json) = match (q, like) {
            (Some(q), None) => {
                let text = q.trim();
                if text.is_empty() {
                    return Err(Reply::error(400, "q is empty: type what to look for"));
                }
                if text.len() > MAX_QUERY {
                    return Err(Reply::error(
                        400,
                        format!("q is {} bytes long; at most {MAX_QUERY}", text.len()),
                    ));
                }
                let v = (self.embed)(text).map_err(|e| Reply::error(500, e))?;
                (v, json!(text), json!(null))
            }
            (None, Some(like)) => {
                let id: i64 = like.parse().map_err(|_| {
                    Reply::error(400, format!("like={like}: give a tile id (a number)"))
                })?;
                let v = self
                    .vectors
                    .get(id)
                    .ok_or_else(|| Reply::error(404, format!("no tile {id} in this index")))?
                    .to_vec();
                (v, json!(null), json!(id))
            }
            (Some(_), Some(_)) => return Err(Reply::error(400, "give q or like, not both")),
            (None, None) => {
                return Err(Reply::error(
                    400,
                    "nothing to search for: give q=TEXT (or like=TILE_ID)",
                ))
            }
        };
        if vector.len() != self.vectors.dim {
            return Err(Reply::error(
                500,
                format!(
                    "the query vector has {} values, the index {}",
                    vector.len(),
                    self.vectors.dim
                ),
            ));
        }
        let hits = exact::search(&self.vectors, &vector, k);
        let index = self.index.lock().expect("index lock");
        let results = ranked(&index, &hits).map_err(|e| Reply::error(500, e.to_string()))?;
        Ok(Reply::json(
            200,
            &json!({
                "query": q_json, "like": like_json, "k": k, "total": self.vectors.len(),
                "took_ms": start.elapsed().as_secs_f64() * 1e3,
                "results": results,
            }),
        ))
    }

    /// The decoded source image `rel`, through a small cache.
    fn source(&self, rel: &str) -> std::result::Result<Arc<RgbImage>, Reply> {
        if let Some((_, img)) = self
            .cache
            .lock()
            .expect("cache lock")
            .iter()
            .find(|(r, _)| r == rel)
        {
            return Ok(img.clone());
        }
        let path = resolve_inside(&self.root, rel).ok_or_else(|| {
            Reply::error(
                404,
                format!("{rel} is not a readable file under the indexed folder"),
            )
        })?;
        let img = Arc::new(
            load_raster(&path, self.bands.as_ref())
                .map_err(|e| Reply::error(500, format!("cannot read the source image: {e}")))?,
        );
        let mut cache = self.cache.lock().expect("cache lock");
        cache.push_front((rel.to_string(), img.clone()));
        cache.truncate(CACHE_IMAGES);
        Ok(img)
    }

    fn tile(&self, rest: &str) -> std::result::Result<Reply, Reply> {
        let id = rest
            .strip_suffix(".png")
            .filter(|n| !n.is_empty() && n.len() < 19 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<i64>().ok())
            .ok_or_else(|| Reply::error(400, "a tile is /api/tile/ID.png with ID a number"))?;
        let info = {
            let index = self.index.lock().expect("index lock");
            index
                .tiles(&[id])
                .map_err(|e| Reply::error(500, e.to_string()))?
                .pop()
                .ok_or_else(|| Reply::error(404, format!("no tile {id} in this index")))?
        };
        let img = self.source(&info.file)?;
        let t = info.tile;
        if t.x + t.w > img.width || t.y + t.h > img.height {
            return Err(Reply::error(
                409,
                format!(
                    "{} is {}x{} now, smaller than when it was indexed: rebuild the index",
                    info.file, img.width, img.height
                ),
            ));
        }
        let mut cut = crop(&img, &t);
        let side = t.w.max(t.h);
        if side > THUMB {
            let (w, h) = ((t.w * THUMB / side).max(1), (t.h * THUMB / side).max(1));
            cut = resize_bicubic(&cut, w, h);
        }
        let mut png = Vec::new();
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut png),
            &cut.data,
            cut.width as u32,
            cut.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Reply::error(500, format!("cannot encode PNG: {e}")))?;
        Ok(Reply {
            status: 200,
            content_type: "image/png",
            body: png,
        })
    }
}

/// Listen on `addr` (`host:port`; port 0 picks a free one).
pub fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| Error::Other(format!("cannot listen on {addr}: {e}")))
}

/// The longest request head (request line and headers) read.
const MAX_HEAD: usize = 16 * 1024;

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

/// The request line of one HTTP/1.x request read from `stream` (the headers are read and
/// ignored; GET has no body), or the error reply to send.
fn read_request(stream: &mut TcpStream) -> std::result::Result<(String, String), Reply> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(Reply::error(413, "request head too long"));
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return Err(Reply::error(400, "incomplete request")),
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line =
        std::str::from_utf8(line).map_err(|_| Reply::error(400, "request line is not UTF-8"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        [method, target, version] if version.starts_with("HTTP/1.") => {
            Ok((method.to_string(), target.to_string()))
        }
        _ => Err(Reply::error(400, "malformed request line")),
    }
}

fn write_reply(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&reply.body)?;
    stream.flush()
}

/// Answer requests on `listener` with `threads` threads, one request per connection
/// (`Connection: close`), until `stop` is set (and one more connection wakes the listener);
/// `log` prints a line per request (method, target, status, time) to stderr.
pub fn run(app: Arc<App>, listener: TcpListener, threads: usize, log: bool, stop: &AtomicBool) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<TcpStream>(64);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            let (app, rx) = (app.clone(), &rx);
            s.spawn(move || loop {
                let next = rx.lock().expect("queue lock").recv();
                let Ok(mut stream) = next else { return };
                let timeout = Some(std::time::Duration::from_secs(10));
                let _ = stream.set_read_timeout(timeout);
                let _ = stream.set_write_timeout(timeout);
                let start = std::time::Instant::now();
                let (target, reply) = match read_request(&mut stream) {
                    Ok((method, target)) => {
                        let reply = app.handle(&method, &target);
                        (format!("{method} {target}"), reply)
                    }
                    Err(reply) => ("(bad request)".to_string(), reply),
                };
                if log {
                    eprintln!(
                        "{target} {} {:.1} ms",
                        reply.status,
                        start.elapsed().as_secs_f64() * 1e3
                    );
                }
                // a client that went away is not our error
                let _ = write_reply(&mut stream, &reply);
                let _ = stream.shutdown(std::net::Shutdown::Both);
            });
        }
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(stream) = stream {
                if tx.send(stream).is_err() {
                    break;
                }
            }
        }
        drop(tx);
    });
}
