//! `harma serve`: a web page (search box, a grid of result tiles with score, file and
//! coordinates; a click asks for more like that tile) and the JSON API behind it:
//!
//! - `GET /api/search?q=TEXT&k=20`: the k tiles nearest to the text (k from 1 to 500);
//! - `GET /api/search?like=ID&k=20`: the k tiles nearest to tile ID ("more like this");
//! - `GET /api/tile/ID.png`: tile ID cut from its source image, at most 256 pixels a side;
//! - `GET /api/info`: the index's size and settings.
//!
//! The page is compiled into the binary; nothing is fetched from elsewhere. Requests name
//! tiles by number only, never by path: a tile's file comes from the index's `files` table and
//! is opened only if its stored path is relative without `..`, it lies, links resolved, inside
//! the image folder (`--images`, else the folder the index recorded; never `/`), and its size
//! and modification time are those recorded when it was indexed. Every search reads the
//! vectors, the ranking and the results' rows from one revision of the index; after a build
//! changed it, the next request loads the new vectors first. Bad requests get a 4xx status and
//! a JSON `{"error": ...}` that says what was wrong; a damaged index row a 500 naming it.

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
use crate::store::{stat, Index, TileSource, Vectors, View};
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

/// The index and the vectors of one of its revisions, in memory.
struct State {
    index: Index,
    revision: u64,
    vectors: Vectors,
}

impl State {
    /// `f` on one consistent view of the index and the vectors of that view's revision: when a
    /// build changed the index since they were loaded, the new vectors are loaded first.
    fn read<T>(&mut self, mut f: impl FnMut(&View, &Vectors) -> Result<T>) -> Result<T> {
        let State {
            index,
            revision,
            vectors,
        } = self;
        index.read(|view| {
            let now = view.revision()?;
            if now != *revision {
                *vectors = view.vectors()?;
                *revision = now;
            }
            f(view, vectors)
        })
    }
}

/// A decoded image with its path, size and modification time.
type Cached = (String, u64, i64, Arc<RgbImage>);

/// The server's state: the index with its vectors in memory, the image folder, the text
/// embedder.
pub struct App {
    state: Mutex<State>,
    root: PathBuf,
    bands: Option<Bands>,
    embed: TextEmbedder,
    model: String,
    cache: Mutex<VecDeque<Cached>>,
}

/// A lock, taken even if a thread panicked while holding it (the data behind each lock here
/// is replaced whole, never left half-written).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    /// Load the index's vectors and get ready to answer. Images are read from `images` when
    /// given (an archive that moved), else from the folder the index recorded, which must be
    /// an absolute path; either way not from the root of the file system.
    pub fn new(mut index: Index, images: Option<PathBuf>, embed: TextEmbedder) -> Result<App> {
        let (revision, vectors) = index.read(|v| Ok((v.revision()?, v.vectors()?)))?;
        let refuse = |msg: String| Error::Index {
            path: index.dir.display().to_string(),
            msg,
        };
        let root = match images {
            Some(dir) => dir,
            None if index.settings.images.is_absolute() => index.settings.images.clone(),
            None => {
                return Err(refuse(format!(
                    "the recorded images folder `{}` is not an absolute path (a build records \
                     one): give the folder with --images DIR",
                    index.settings.images.display()
                )))
            }
        };
        let root = root.canonicalize().map_err(|e| Error::io(&root, e))?;
        if root.parent().is_none() {
            return Err(refuse(format!(
                "the images folder is {}, the root of the file system: refusing to serve \
                 every image on the disk; give the indexed folder with --images DIR",
                root.display()
            )));
        }
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
            state: Mutex::new(State {
                index,
                revision,
                vectors,
            }),
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
        let mut state = lock(&self.state);
        let s = state.index.settings.clone();
        match state.read(|view, vectors| Ok((view.counts()?, vectors.len()))) {
            Ok(((files, unreadable, tiles), searchable)) => Reply::json(
                200,
                &json!({
                    "files": files, "unreadable_files": unreadable, "tiles": tiles,
                    "searchable": searchable,
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
        let (query, q_json, like_json) = match (q, like) {
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
                (Ok(v), json!(text), json!(null))
            }
            (None, Some(like)) => {
                let id: i64 = like.parse().map_err(|_| {
                    Reply::error(400, format!("like={like}: give a tile id (a number)"))
                })?;
                (Err(id), json!(null), json!(id))
            }
            (Some(_), Some(_)) => return Err(Reply::error(400, "give q or like, not both")),
            (None, None) => {
                return Err(Reply::error(
                    400,
                    "nothing to search for: give q=TEXT (or like=TILE_ID)",
                ))
            }
        };
        // the vectors, the search and the results' rows all from one revision of the index
        let found = lock(&self.state).read(|view, vectors| {
            let vector = match &query {
                Ok(v) => v.as_slice(),
                Err(id) => match vectors.get(*id) {
                    Some(v) => v,
                    None => return Ok(None),
                },
            };
            if vector.len() != vectors.dim {
                return Err(Error::Other(format!(
                    "the query vector has {} values, the index {}",
                    vector.len(),
                    vectors.dim
                )));
            }
            let hits = exact::search(vectors, vector, k);
            Ok(Some((ranked(view, &hits)?, vectors.len())))
        });
        let (results, total) = match found {
            Ok(Some(found)) => found,
            Ok(None) => {
                let id = query.err().unwrap_or_default();
                return Err(Reply::error(404, format!("no tile {id} in this index")));
            }
            Err(e) => return Err(Reply::error(500, e.to_string())),
        };
        Ok(Reply::json(
            200,
            &json!({
                "query": q_json, "like": like_json, "k": k, "total": total,
                "took_ms": start.elapsed().as_secs_f64() * 1e3,
                "results": results,
            }),
        ))
    }

    /// The decoded source image of a tile, through a small cache: read only if it is a
    /// file inside the image folder (links resolved) whose size and modification time are
    /// those the index recorded.
    fn source(&self, src: &TileSource) -> std::result::Result<Arc<RgbImage>, Reply> {
        let rel = &src.tile.file;
        let path = resolve_inside(&self.root, rel).ok_or_else(|| {
            Reply::error(
                404,
                format!("{rel} is not a readable file under the indexed folder"),
            )
        })?;
        let (size, mtime_ns) = stat(&path).map_err(|e| Reply::error(404, e.to_string()))?;
        if size as i64 != src.size || mtime_ns != src.mtime_ns {
            return Err(Reply::error(
                409,
                format!(
                    "{rel} changed since it was indexed (its size or modification time differs): \
                     rebuild the index"
                ),
            ));
        }
        if let Some((.., img)) = lock(&self.cache)
            .iter()
            .find(|(r, s, t, _)| (r, *s, *t) == (rel, size, mtime_ns))
        {
            return Ok(img.clone());
        }
        let img = Arc::new(
            load_raster(&path, self.bands.as_ref())
                .map_err(|e| Reply::error(500, format!("cannot read the source image: {e}")))?,
        );
        let mut cache = lock(&self.cache);
        cache.push_front((rel.clone(), size, mtime_ns, img.clone()));
        cache.truncate(CACHE_IMAGES);
        Ok(img)
    }

    fn tile(&self, rest: &str) -> std::result::Result<Reply, Reply> {
        let id = rest
            .strip_suffix(".png")
            .filter(|n| !n.is_empty() && n.len() < 19 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<i64>().ok())
            .ok_or_else(|| Reply::error(400, "a tile is /api/tile/ID.png with ID a number"))?;
        let src = lock(&self.state)
            .index
            .tile(id)
            .map_err(|e| Reply::error(500, e.to_string()))?
            .ok_or_else(|| Reply::error(404, format!("no tile {id} in this index")))?;
        let img = self.source(&src)?;
        let t = src.tile.tile;
        let inside =
            |at: usize, len: usize, side: usize| at.checked_add(len).is_some_and(|e| e <= side);
        if !(inside(t.x, t.w, img.width) && inside(t.y, t.h, img.height)) {
            return Err(Reply::error(
                409,
                format!(
                    "tile {id} ({},{} {}x{}) does not fit in {}, {}x{}: rebuild the index",
                    t.x, t.y, t.w, t.h, src.tile.file, img.width, img.height
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
                let next = lock(rx).recv();
                let Ok(mut stream) = next else { return };
                let timeout = Some(std::time::Duration::from_secs(10));
                let _ = stream.set_read_timeout(timeout);
                let _ = stream.set_write_timeout(timeout);
                let start = std::time::Instant::now();
                let (target, reply) = match read_request(&mut stream) {
                    Ok((method, target)) => {
                        // a bug answers 500 and leaves the worker alive
                        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            app.handle(&method, &target)
                        }))
                        .unwrap_or_else(|_| {
                            Reply::error(500, "internal error answering this request (a bug)")
                        });
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
