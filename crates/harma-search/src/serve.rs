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
//!
//! The HTTP/1.1 server is hyper's, on a tokio runtime of its own ([`run_with`]): keep-alive,
//! a deadline for each request head (which also closes idle and silent connections), one for
//! each answer, a cap on open connections, requests only for this host (an IP address,
//! `localhost` or a name given in [`ServeConfig::hosts`]), and a Content-Security-Policy on
//! every reply. Searches run on a pool of `threads` blocking threads, never on the threads
//! that read connections.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use harma_data::LoadLimits;
use harma_data::{resize_bicubic, RgbImage};
use harma_raster::{crop, load_raster, Bands};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{
    HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    limits: LoadLimits,
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
    /// Thumbnails are decoded within `limits` (default: [`LoadLimits::default`]).
    pub fn with_limits(self, limits: LoadLimits) -> App {
        App { limits, ..self }
    }

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
            limits: LoadLimits::default(),
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
            // browsers ask for it on every load: nothing, rather than a 404 in their console
            "/favicon.ico" => Reply {
                status: 204,
                content_type: "image/x-icon",
                body: Vec::new(),
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
            load_raster(&path, self.bands.as_ref(), self.limits)
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

/// Where `--log` lines go: one call per line, without the newline.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// How the server treats its clients; [`ServeConfig::default`] holds the defaults.
#[derive(Clone)]
pub struct ServeConfig {
    /// Requests answered at once (searches, thumbnails); more wait for a free thread.
    pub threads: usize,
    /// Connections open at once; more wait in the system's listen queue.
    pub max_connections: usize,
    /// A client has this long to send a request head, counted from when its connection opened
    /// or its last answer was sent: a slow or silent client, and an idle keep-alive
    /// connection, are closed then.
    pub header_timeout: Duration,
    /// From a request's head to the last byte of its answer: a request still unanswered then
    /// gets a 503, and a client that does not read its answer is cut off.
    pub request_timeout: Duration,
    /// The longest request head (request line and headers), in bytes; a longer one gets a 431.
    pub max_head: usize,
    /// Host names this server answers to besides IP addresses and `localhost` (the name it
    /// was bound by, one a proxy forwards): a page that asks for any other name is refused,
    /// so a DNS-rebinding page cannot read the API.
    pub hosts: Vec<String>,
    /// A line per request (method, target, status, milliseconds); control characters in it
    /// are escaped ([`escape_log`]).
    pub log: Option<Log>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            threads: 4,
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_head: 16 * 1024,
            hosts: Vec::new(),
            log: None,
        }
    }
}

/// Answer requests on `listener` with `threads` threads until `stop` is set (checked every
/// 100 ms and on each new connection); `log` prints a line per request to stderr. The
/// defaults of [`ServeConfig`] otherwise; see [`run_with`].
pub fn run(app: Arc<App>, listener: TcpListener, threads: usize, log: bool, stop: &AtomicBool) {
    let log: Option<Log> = log.then(|| Arc::new(|line: &str| eprintln!("{line}")) as Log);
    let cfg = ServeConfig {
        threads,
        log,
        ..ServeConfig::default()
    };
    run_with(app, listener, &cfg, stop)
}

/// Answer HTTP/1.1 requests on `listener` (hyper on a runtime of its own; keep-alive) until
/// `stop` is set. Requests run [`App::handle`] on at most `cfg.threads` threads, so a search
/// never holds up reading other connections; a panic there is a 500 and the server goes on.
/// Every reply carries a Content-Security-Policy that allows the page's own script and style
/// and requests to this server only.
pub fn run_with(app: Arc<App>, listener: TcpListener, cfg: &ServeConfig, stop: &AtomicBool) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.threads.max(1))
        .thread_name("harma-serve")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the server's runtime: {e}");
            return;
        }
    };
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .max_header_size(cfg.max_head)
        .keep_alive(true);
    let shared = Arc::new(Shared {
        app,
        cfg: cfg.clone(),
        http,
        csp: content_security_policy(PAGE),
    });
    rt.block_on(accept(shared, listener, stop));
    // connections still open are dropped; a request being answered finishes first
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// What every connection's task shares.
struct Shared {
    app: Arc<App>,
    cfg: ServeConfig,
    http: http1::Builder,
    csp: String,
}

/// How often the accept loop looks at `stop`.
const TICK: Duration = Duration::from_millis(100);

async fn accept(shared: Arc<Shared>, listener: TcpListener, stop: &AtomicBool) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(shared.cfg.max_connections.max(1)));
    while !stop.load(Ordering::SeqCst) {
        // a free slot first: beyond the cap, connections wait in the listen queue
        let Ok(slot) = tokio::time::timeout(TICK, slots.clone().acquire_owned()).await else {
            continue;
        };
        let Ok(slot) = slot else { return };
        let (stream, peer) = match tokio::time::timeout(TICK, listener.accept()).await {
            Ok(Ok(accepted)) => accepted,
            // out of file descriptors, say: try again shortly rather than spin
            Ok(Err(_)) => {
                tokio::time::sleep(TICK).await;
                continue;
            }
            Err(_) => continue,
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        tokio::spawn(connection(shared.clone(), stream, peer, slot));
    }
}

/// Serve one connection: its requests one after another (keep-alive) until the client closes
/// it or misses a deadline.
async fn connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let deadline = Arc::new(Mutex::new(
        tokio::time::Instant::now() + shared.cfg.request_timeout,
    ));
    let io = TokioIo::new(Guarded {
        stream,
        deadline: deadline.clone(),
        timer: None,
    });
    let service = {
        let shared = shared.clone();
        service_fn(move |req| answer(shared.clone(), deadline.clone(), req))
    };
    if let Err(e) = shared.http.serve_connection(io, service).await {
        if let Some(log) = &shared.cfg.log {
            log(&escape_log(&format!("(connection from {peer}) {e}")));
        }
    }
}

/// One request: the Host check, then [`App::handle`] on a blocking thread within the deadline.
async fn answer(
    shared: Arc<Shared>,
    deadline: Arc<Mutex<tokio::time::Instant>>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let start = std::time::Instant::now();
    let timeout = shared.cfg.request_timeout;
    *lock(&deadline) = tokio::time::Instant::now() + timeout;
    let method = req.method().as_str().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().to_string(), |p| p.as_str().to_string());
    let has_body = !req.body().is_end_stream();
    let reply = if let Err(refused) = check_host(&req, &shared.cfg.hosts) {
        refused
    } else if has_body {
        Reply::error(413, "a request here carries no body")
    } else {
        let (app, m, t) = (shared.app.clone(), method.clone(), target.clone());
        let task = AbortOnDrop(tokio::task::spawn_blocking(move || {
            // a bug answers 500 and leaves the server running
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| app.handle(&m, &t)))
                .unwrap_or_else(|_| {
                    Reply::error(500, "internal error answering this request (a bug)")
                })
        }));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Reply::error(500, "internal error answering this request (a bug)"),
            Err(_) => Reply::error(
                503,
                format!(
                    "no answer within {} s: the server is busy, try again",
                    timeout.as_secs_f64()
                ),
            ),
        }
    };
    if let Some(log) = &shared.cfg.log {
        log(&escape_log(&format!(
            "{method} {} {} {:.1} ms",
            req.uri(),
            reply.status,
            start.elapsed().as_secs_f64() * 1e3
        )));
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Ok(csp) = HeaderValue::from_str(&shared.csp) {
        headers.insert(CONTENT_SECURITY_POLICY, csp);
    }
    if has_body {
        // the body is not read: the connection cannot carry another request
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// A blocking task that is not started if its answer is no longer wanted (the client left,
/// the deadline passed); one already running finishes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// The request's host (its absolute-form target's, else its Host header's) if this server
/// answers to it, else the 421 to send. A browser sends the name from the page's address, so
/// a page on another site whose name was made to resolve here (DNS rebinding) is refused; an
/// IP address (any: the server may be reached through several, or forwarded) or `localhost`
/// cannot be such a name. The port is not compared: a tunnel or proxy may change it.
fn check_host<B>(req: &Request<B>, hosts: &[String]) -> std::result::Result<(), Reply> {
    let host = match req.uri().authority() {
        Some(a) => a.as_str().to_string(),
        None => match req.headers().get(HOST).map(|h| h.to_str()) {
            Some(Ok(h)) => h.to_string(),
            Some(Err(_)) => return Err(Reply::error(400, "the Host header is not text")),
            None => return Err(Reply::error(400, "no Host header: name the server you ask")),
        },
    };
    if host_allowed(&host, hosts) {
        Ok(())
    } else {
        Err(Reply::error(
            421,
            format!(
                "this server does not answer to the host `{}`: open it by its IP address or \
                 localhost (a name of its own is given to `run_with` in ServeConfig::hosts)",
                escape_log(&host)
            ),
        ))
    }
}

/// Whether `host` (`name[:port]`, `[v6][:port]`, an `authority` without user info) is an IP
/// address, `localhost` or one of `names` (ASCII case and a final dot ignored).
pub fn host_allowed(host: &str, names: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(is_port) => {
                return v6.parse::<Ipv6Addr>().is_ok()
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && (name.parse::<Ipv4Addr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || names.iter().any(|n| {
                let n = n.strip_suffix('.').unwrap_or(n);
                n.eq_ignore_ascii_case(name)
            }))
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `line` made [`crate::output::printable`] (control characters, bidirectional overrides and
/// backslashes as `\u{..}`), so a request cannot colour a terminal or forge or split log lines.
pub fn escape_log(line: &str) -> String {
    crate::output::printable(line).into_owned()
}

/// The Content-Security-Policy of every reply: nothing by default; the page's own inline
/// script and style by their SHA-256 (so no other script runs, injected or not), images and
/// requests from this server only, no framing.
fn content_security_policy(page: &str) -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; img-src 'self'; connect-src 'self'; \
         form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        inline_hashes(page, "script"),
        inline_hashes(page, "style"),
    )
}

/// `'sha256-...'` for the text of each `<tag>...</tag>` element in `page`, or `'none'`.
fn inline_hashes(page: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut hashes = Vec::new();
    let mut rest = page;
    while let Some(at) = rest.find(&open) {
        let body = &rest[at + open.len()..];
        let Some(end) = body.find(&close) else { break };
        hashes.push(format!(
            "'sha256-{}'",
            base64(&Sha256::digest(&body.as_bytes()[..end]))
        ));
        rest = &body[end + close.len()..];
    }
    if hashes.is_empty() {
        "'none'".to_string()
    } else {
        hashes.join(" ")
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A connection whose writes fail once the deadline of the request being answered has
/// passed, so a client that stops reading its answer cannot hold the connection.
struct Guarded {
    stream: tokio::net::TcpStream,
    deadline: Arc<Mutex<tokio::time::Instant>>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Guarded {
    /// A write could not go on: wait for the socket (already registered) or the deadline.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let at = *lock(&self.deadline);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answer in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.stalled(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stalled(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending => this.stalled(cx),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_this_server_pass() {
        let names = ["search.lan".to_string()];
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "10.1.2.3:80",
            "localhost:8080",
            "LOCALHOST",
            "localhost.:1",
            "[::1]:8080",
            "[::1]",
            "[fe80::1]:9",
            "search.lan:8080",
            "Search.LAN.",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "localhost.evil.example:8080",
            "search.lan.evil.example",
            "",
            ":8080",
            "127.0.0.1:80:80",
            "127.0.0.1:port",
            "[::1",
            "[::1]x",
            "[evil.example]:80",
            "0x7f.1:8080",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }

    #[test]
    fn log_lines_cannot_be_forged() {
        let line = escape_log("GET /a\x1b[31mred\r\n127.0.0.1 GET /admin 200\\u{1b} \u{202e}x 200");
        assert_eq!(
            line,
            "GET /a\\u{1b}[31mred\\u{d}\\u{a}127.0.0.1 GET /admin 200\\u{5c}u{1b} \\u{202e}x 200"
        );
        assert!(!line.chars().any(|c| c.is_control()));
        assert_eq!(
            escape_log("GET /api/search?q=%1b 200"),
            "GET /api/search?q=%1b 200"
        );
    }

    #[test]
    fn base64_matches_rfc_4648() {
        // RFC 4648 section 10
        for (raw, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), coded);
        }
    }

    #[test]
    fn the_policy_allows_exactly_the_page_inline_script_and_style() {
        let csp = content_security_policy(PAGE);
        assert!(csp.starts_with("default-src 'none'; "), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        // one script and one style element, no inline handlers or style attributes that a
        // hash cannot allow
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(!PAGE.contains(" style="));
        assert!(!PAGE.contains(" onclick=") && !PAGE.contains(" onload="));
        let script = PAGE
            .split("<script>")
            .nth(1)
            .unwrap()
            .split("</script>")
            .next()
            .unwrap();
        let hash = base64(&Sha256::digest(script.as_bytes()));
        assert!(
            csp.contains(&format!("script-src 'sha256-{hash}';")),
            "{csp}"
        );
        assert_eq!(inline_hashes("<p>none</p>", "script"), "'none'");
    }

    #[test]
    fn a_client_that_does_not_read_is_cut_off_at_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let start = tokio::time::Instant::now();
            let wait = Duration::from_millis(300);
            let mut g = Guarded {
                stream,
                deadline: Arc::new(Mutex::new(start + wait)),
                timer: None,
            };
            let chunk = vec![0u8; 1 << 16];
            let mut sent = 0usize;
            // the client never reads: the system's buffers fill, then the deadline passes
            let e = loop {
                match std::future::poll_fn(|cx| Pin::new(&mut g).poll_write(cx, &chunk)).await {
                    Ok(n) => sent += n,
                    Err(e) => break e,
                }
                assert!(
                    sent < 1 << 30,
                    "1 GiB written to a client that reads nothing"
                );
            };
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
            let t = start.elapsed();
            assert!(t >= wait && t < wait * 10, "{t:?}");
        });
    }
}
