//! The index on disk: one folder holding `index.sqlite` (settings, files, tiles; SQLite in WAL
//! mode) and `vectors-N.f32` (the tiles' embeddings, `dim` little-endian f32 per row, rows in
//! the order they were added).
//!
//! Crash consistency: the vector file is only ever appended to. A batch is added by (1) writing
//! its rows after the committed ones and syncing the file, then (2) one SQLite transaction that
//! inserts its tiles (each naming its row) and moves the committed row count `rows` in `meta`.
//! A crash before (2) commits leaves rows past `rows` that no tile names: readers ignore them
//! and the next writer cuts them off. A crash inside (2) is SQLite's to roll back. So an
//! interrupted build loses at most the batch in flight, and a reader sees a whole batch or
//! none of it. Compaction (after files changed or vanished) writes the live rows to the next
//! `vectors-N.f32`, then switches every tile and `meta.vectors` to it in one transaction; the
//! file that is not named in `meta` is a leftover, removed by the next writer.
//!
//! Creation is atomic too: the tables and settings are written to a temp file beside
//! `index.sqlite`, flushed, and linked into place under that name, so `index.sqlite` never
//! exists without its tables; a temp file left by a killed build is removed by the next one.
//! Every commit that changes files or tiles bumps `meta.revision`, so that a reader holding the
//! vectors in memory (`harma serve`) sees that they are stale.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use harma_raster::{GeoRef, Tile};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The format written in `meta.format`.
/// Whether this build aborts where a test asks it to (`Writer::crash_after`,
/// `Writer::open_crashing`): the `fault-injection` feature, which only tests turn on.
pub const FAULT_INJECTION: bool = cfg!(feature = "fault-injection");

pub const FORMAT: &str = "harma-index 1";
const DB: &str = "index.sqlite";
/// The steps of creating an index that a test can crash after ([`Writer::open_crashing`]).
pub const CREATE_STEPS: usize = 7;

/// What an index was built with; a search must use the same model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The images folder (absolute); tiles' paths are relative to it.
    pub images: PathBuf,
    pub model: FileId,
    /// The adapters' file, when they came from one other than the model.
    pub adapters: Option<FileId>,
    /// `--arch` as given, and the architecture it resolved to (JSON).
    pub arch: String,
    pub arch_config: serde_json::Value,
    /// `--sharing` (where the BiShareAdapters sit).
    pub sharing: String,
    /// The embedding size.
    pub dim: usize,
    /// The model's input size (pixels).
    pub image_size: usize,
    pub tile: usize,
    pub stride: usize,
    /// `--bands`, 1-based, when given.
    pub bands: Option<String>,
    /// `--shard I/N`: the share of the folder's files this index holds, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

/// A file as it was when the index was built: where, its sha256, and its size and modification
/// time (to skip hashing an unchanged file again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Size and modification time (ns since the epoch) of a file.
pub fn stat(path: &Path) -> Result<(u64, i64)> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64);
    Ok((m.len(), mtime))
}

impl FileId {
    /// Identify `path` (absolute): its sha256, size and time; `known` is reused instead of
    /// hashing when it names the same path, size and time.
    pub fn of(path: &Path, known: Option<&FileId>) -> Result<FileId> {
        let path = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
        let (size, mtime_ns) = stat(&path)?;
        if let Some(k) = known {
            if k.path == path && k.size == size && k.mtime_ns == mtime_ns {
                return Ok(k.clone());
            }
        }
        Ok(FileId {
            sha256: harma_data::sha256_file(&path)?,
            path,
            size,
            mtime_ns,
        })
    }
}

/// One tile as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TileInfo {
    pub id: i64,
    /// Relative to the images folder, `/`-separated.
    pub file: String,
    #[serde(flatten)]
    pub tile: Tile,
    /// The tile's box in its CRS, for georeferenced rasters.
    pub bbox: Option<[f64; 4]>,
    pub epsg: Option<u32>,
}

/// A tile to add.
#[derive(Debug, Clone)]
pub struct NewTile {
    pub file_id: i64,
    /// Its place in its file's tile grid.
    pub seq: usize,
    pub tile: Tile,
}

/// What a batch tells about a file: its size and georeferencing when its first tile is added,
/// and that it is complete with its last.
#[derive(Debug, Clone)]
pub struct FileUpdate {
    pub file_id: i64,
    pub width: usize,
    pub height: usize,
    pub n_tiles: usize,
    pub geo: Option<GeoRef>,
}

/// A file of the images folder as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Relative to the images folder, `/`-separated.
    pub rel: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// A file still to embed (new, changed, or interrupted) and how many of its tiles are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub file_id: i64,
    pub rel: String,
    pub tiles_done: usize,
}

/// What [`Writer::sync_files`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub unchanged: usize,
    pub new: usize,
    pub changed: usize,
    pub removed: usize,
    pub resumed: usize,
}

fn db_err(dir: &Path, e: rusqlite::Error) -> Error {
    Error::Sqlite {
        path: dir.join(DB).display().to_string(),
        source: e,
    }
}

fn vectors_name(generation: u64) -> String {
    format!("vectors-{generation}.f32")
}

fn get_meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// Bump `meta.revision` (indexes written before it existed start at 1).
fn bump_revision(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('revision', '1')
         ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        [],
    )?;
    Ok(())
}

/// The committed state: the settings, the vector file's generation and its committed rows.
fn read_state(conn: &Connection, dir: &Path) -> Result<(Settings, u64, u64)> {
    let bad = |msg: &str| Error::Index {
        path: dir.display().to_string(),
        msg: msg.to_string(),
    };
    let format = get_meta(conn, "format")
        .map_err(|e| db_err(dir, e))?
        .ok_or_else(|| bad("not a harma index (no format record)"))?;
    if format != FORMAT {
        return Err(bad(&format!(
            "index format `{format}`, this harma reads `{FORMAT}`: rebuild the index"
        )));
    }
    let settings: Settings = serde_json::from_str(
        &get_meta(conn, "settings")
            .map_err(|e| db_err(dir, e))?
            .ok_or_else(|| bad("no settings record"))?,
    )
    .map_err(|e| bad(&format!("unreadable settings record: {e}")))?;
    if settings.dim == 0 {
        return Err(bad(
            "the settings record an embedding size of 0: rebuild the index",
        ));
    }
    let num = |key: &str| -> Result<u64> {
        get_meta(conn, key)
            .map_err(|e| db_err(dir, e))?
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(&format!("no `{key}` record")))
    };
    Ok((settings, num("generation")?, num("rows")?))
}

/// Adds to an index; one at a time (SQLite's write lock).
pub struct Writer {
    dir: PathBuf,
    conn: Connection,
    pub settings: Settings,
    generation: u64,
    vectors: File,
    rows: u64,
    /// Testing only: abort the process after this many more batches are appended, between
    /// writing their vectors and committing them (a crash at the worst moment).
    pub crash_after: Option<usize>,
}

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    width INTEGER, height INTEGER, n_tiles INTEGER,
    geo TEXT,
    error TEXT
);
CREATE TABLE tiles(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id),
    seq INTEGER NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
    edge INTEGER NOT NULL,
    row INTEGER NOT NULL UNIQUE,
    min_x REAL, min_y REAL, max_x REAL, max_y REAL,
    UNIQUE(file_id, seq)
);
";

fn open_conn(dir: &Path, flags: OpenFlags) -> Result<Connection> {
    let conn = Connection::open_with_flags(dir.join(DB), flags).map_err(|e| db_err(dir, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| db_err(dir, e))?;
    Ok(conn)
}

/// What an index's temp files are called: `.index.sqlite.tmp-PID` (and SQLite's `-journal`
/// beside it).
const TEMP_PREFIX: &str = ".index.sqlite.tmp-";

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Flush a folder's entries (a rename or link in it) to disk.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        d.sync_all().ok();
    }
}

/// Remove the temp files of index creations by processes no longer running (killed).
fn remove_stale_temps(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let alive = pid == std::process::id().to_string()
            || (!pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            remove_if_exists(&e.path())?;
        }
    }
    Ok(())
}

/// Whether `dir`'s `index.sqlite` has no tables at all (a creation by an older harma that was
/// killed before its first commit; nothing was in it).
fn holds_no_tables(dir: &Path) -> Result<bool> {
    let conn = open_conn(dir, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| db_err(dir, e))?;
    Ok(n == 0)
}

/// Create `dir`'s `index.sqlite` with `settings`, atomically: the tables are written to a temp
/// file, flushed, and linked into place, so that the name never holds a partial index (a
/// concurrent creation that got there first wins). `crash(step)` is the test hook of
/// [`Writer::open_crashing`] (steps 1 to 5 here).
fn create_db(dir: &Path, settings: &Settings, crash: &dyn Fn(usize)) -> Result<()> {
    let tmp = dir.join(format!("{TEMP_PREFIX}{}", std::process::id()));
    let journal = dir.join(format!("{TEMP_PREFIX}{}-journal", std::process::id()));
    remove_if_exists(&tmp)?;
    remove_if_exists(&journal)?;
    let tmp_err = |e| Error::Sqlite {
        path: tmp.display().to_string(),
        source: e,
    };
    {
        let mut conn = Connection::open(&tmp).map_err(tmp_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(tmp_err)?;
        crash(1);
        let tx = conn.transaction().map_err(tmp_err)?;
        tx.execute_batch(SCHEMA).map_err(tmp_err)?;
        let json = serde_json::to_string(settings).expect("settings serialise");
        for (key, value) in [
            ("format", FORMAT),
            ("settings", &json),
            ("generation", "0"),
            ("rows", "0"),
            ("revision", "0"),
        ] {
            set_meta(&tx, key, value).map_err(tmp_err)?;
        }
        crash(2);
        tx.commit().map_err(tmp_err)?;
        crash(3);
    }
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    let db = dir.join(DB);
    match std::fs::hard_link(&tmp, &db) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        // a file system without links
        Err(_) => std::fs::rename(&tmp, &db).map_err(|e| Error::io(&db, e))?,
    }
    sync_dir(dir);
    crash(4);
    remove_if_exists(&tmp)?;
    sync_dir(dir);
    crash(5);
    Ok(())
}

impl Writer {
    /// Open the index in `dir` for adding, creating it with `settings` if it does not exist. An
    /// existing index must have been built with the same settings (`same` compares them and
    /// says what differs). Cuts off rows an interrupted batch left past the committed ones and
    /// removes leftover vector files, and what an interrupted creation left.
    pub fn open(
        dir: &Path,
        settings: &Settings,
        same: impl Fn(&Settings, &Settings) -> std::result::Result<(), String>,
    ) -> Result<Writer> {
        Writer::open_crashing(dir, settings, same, None)
    }

    /// [`Writer::open`]; testing only (the `fault-injection` feature): when it creates the index, `crash_after` (1 to
    /// [`CREATE_STEPS`]) aborts the process after that step (a `kill -9` at that instant).
    pub fn open_crashing(
        dir: &Path,
        settings: &Settings,
        same: impl Fn(&Settings, &Settings) -> std::result::Result<(), String>,
        crash_after: Option<usize>,
    ) -> Result<Writer> {
        let crash = |step: usize| {
            if FAULT_INJECTION && crash_after == Some(step) {
                eprintln!("crash_after: aborting after step {step} of creating the index");
                std::process::abort();
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        remove_stale_temps(dir)?;
        let db = dir.join(DB);
        if db.exists() && holds_no_tables(dir)? {
            // an older harma killed while creating it: nothing was in it yet
            for suffix in ["", "-wal", "-shm", "-journal"] {
                remove_if_exists(&dir.join(format!("{DB}{suffix}")))?;
            }
        }
        let fresh = !db.exists();
        if fresh {
            let others = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
                .count();
            if others > 0 {
                return Err(Error::Index {
                    path: dir.display().to_string(),
                    msg: "the folder is not empty and holds no index: give a new or empty folder"
                        .into(),
                });
            }
            create_db(dir, settings, &crash)?;
        }
        let conn = open_conn(dir, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| db_err(dir, e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| db_err(dir, e))?;
        if fresh {
            crash(6);
        }
        let (stored, generation, rows) = read_state(&conn, dir)?;
        same(&stored, settings).map_err(|msg| Error::Index {
            path: dir.display().to_string(),
            msg,
        })?;
        // the newest identity of the same model (a moved or re-saved file)
        if stored != *settings {
            let json = serde_json::to_string(settings).expect("settings serialise");
            set_meta(&conn, "settings", &json).map_err(|e| db_err(dir, e))?;
        }
        let name = vectors_name(generation);
        remove_leftovers(dir, &name)?;
        let path = dir.join(&name);
        let vectors = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if fresh {
            crash(7);
        }
        let committed = rows
            .checked_mul(settings.dim as u64 * 4)
            .ok_or_else(|| Error::Index {
                path: dir.display().to_string(),
                msg: format!("`rows` is {rows}, past any vector file: rebuild the index"),
            })?;
        let len = vectors.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < committed {
            return Err(Error::Index {
                path: path.display().to_string(),
                msg: format!("holds {len} bytes, the index names {committed}: the vector file was cut; rebuild the index"),
            });
        }
        if len > committed {
            vectors
                .set_len(committed)
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(Writer {
            dir: dir.to_path_buf(),
            conn,
            settings: settings.clone(),
            generation,
            vectors,
            rows,
            crash_after: None,
        })
    }

    fn db(&self, e: rusqlite::Error) -> Error {
        db_err(&self.dir, e)
    }

    /// Compare the files found on disk with the index, in one transaction: new files are
    /// added, changed ones (size or time) and vanished ones lose their tiles. Returns the
    /// files still to embed, in `found`'s order, with the tiles an interrupted build committed.
    pub fn sync_files(&mut self, found: &[Found]) -> Result<(Vec<Pending>, SyncReport)> {
        let dir = self.dir.clone();
        let db = |e| db_err(&dir, e);
        let tx = self.conn.transaction().map_err(db)?;
        let mut known: HashMap<String, (i64, u64, i64, bool)> = HashMap::new();
        {
            let mut st = tx
                .prepare("SELECT id, path, size, mtime_ns, done FROM files")
                .map_err(db)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(1)?,
                        (r.get(0)?, r.get::<_, i64>(2)? as u64, r.get(3)?, r.get(4)?),
                    ))
                })
                .map_err(db)?;
            for row in rows {
                let (path, v) = row.map_err(db)?;
                known.insert(path, v);
            }
        }
        let mut report = SyncReport::default();
        let mut pending = Vec::new();
        let drop_tiles = |tx: &rusqlite::Transaction, id: i64| {
            tx.execute("DELETE FROM tiles WHERE file_id = ?1", [id])
        };
        for f in found {
            match known.remove(&f.rel) {
                Some((id, size, mtime, done)) if size == f.size && mtime == f.mtime_ns => {
                    if done {
                        report.unchanged += 1;
                    } else {
                        let n: i64 = tx
                            .query_row("SELECT COUNT(*) FROM tiles WHERE file_id = ?1", [id], |r| {
                                r.get(0)
                            })
                            .map_err(db)?;
                        if n > 0 {
                            report.resumed += 1;
                        } else {
                            report.new += 1;
                        }
                        pending.push(Pending {
                            file_id: id,
                            rel: f.rel.clone(),
                            tiles_done: n as usize,
                        });
                    }
                }
                Some((id, ..)) => {
                    report.changed += 1;
                    drop_tiles(&tx, id).map_err(db)?;
                    tx.execute(
                        "UPDATE files SET size = ?2, mtime_ns = ?3, done = 0, width = NULL,
                         height = NULL, n_tiles = NULL, geo = NULL, error = NULL WHERE id = ?1",
                        params![id, f.size as i64, f.mtime_ns],
                    )
                    .map_err(db)?;
                    pending.push(Pending {
                        file_id: id,
                        rel: f.rel.clone(),
                        tiles_done: 0,
                    });
                }
                None => {
                    report.new += 1;
                    tx.execute(
                        "INSERT INTO files(path, size, mtime_ns) VALUES (?1, ?2, ?3)",
                        params![f.rel, f.size as i64, f.mtime_ns],
                    )
                    .map_err(db)?;
                    pending.push(Pending {
                        file_id: tx.last_insert_rowid(),
                        rel: f.rel.clone(),
                        tiles_done: 0,
                    });
                }
            }
        }
        for (_, (id, ..)) in known {
            report.removed += 1;
            drop_tiles(&tx, id).map_err(db)?;
            tx.execute("DELETE FROM files WHERE id = ?1", [id])
                .map_err(db)?;
        }
        if report.new + report.changed + report.removed > 0 {
            bump_revision(&tx).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok((pending, report))
    }

    /// Add a batch: `vectors` holds one row of `dim` floats per tile. `files` are the files
    /// whose first tile is in the batch; `done` those whose last is. Durable when it returns.
    pub fn append(
        &mut self,
        tiles: &[NewTile],
        vectors: &[f32],
        files: &[FileUpdate],
        done: &[i64],
    ) -> Result<()> {
        let dim = self.settings.dim;
        assert_eq!(vectors.len(), tiles.len() * dim, "one vector per tile");
        let path = self.dir.join(vectors_name(self.generation));
        // (1) the rows after the committed ones, on disk before anything names them
        let bytes: Vec<u8> = vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.vectors
            .seek(SeekFrom::Start(self.rows * dim as u64 * 4))
            .and_then(|_| self.vectors.write_all(&bytes))
            .and_then(|_| self.vectors.sync_data())
            .map_err(|e| Error::io(&path, e))?;
        if let Some(n) = self.crash_after.as_mut().filter(|_| FAULT_INJECTION) {
            if *n == 0 {
                eprintln!("crash_after: aborting between writing vectors and committing them");
                std::process::abort();
            }
            *n -= 1;
        }
        // (2) one transaction names them
        let tx = self.conn.transaction().map_err(|e| db_err(&self.dir, e))?;
        let db = |e| db_err(&self.dir, e);
        for f in files {
            let geo = f
                .geo
                .map(|g| serde_json::to_string(&g).expect("georef serialises"));
            tx.execute(
                "UPDATE files SET width = ?2, height = ?3, n_tiles = ?4, geo = ?5 WHERE id = ?1",
                params![
                    f.file_id,
                    f.width as i64,
                    f.height as i64,
                    f.n_tiles as i64,
                    geo
                ],
            )
            .map_err(db)?;
        }
        {
            let mut geo_of: HashMap<i64, Option<GeoRef>> = HashMap::new();
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO tiles(file_id, seq, x, y, w, h, edge, row, min_x, min_y, max_x, max_y)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(db)?;
            for (i, t) in tiles.iter().enumerate() {
                let geo = match geo_of.entry(t.file_id) {
                    std::collections::hash_map::Entry::Occupied(e) => *e.get(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let g: Option<String> = tx
                            .query_row("SELECT geo FROM files WHERE id = ?1", [t.file_id], |r| {
                                r.get(0)
                            })
                            .map_err(db)?;
                        *e.insert(g.and_then(|g| serde_json::from_str(&g).ok()))
                    }
                };
                let bbox = geo.and_then(|g| g.bbox(&t.tile));
                let b = |k: usize| bbox.map(|b| b[k]);
                st.execute(params![
                    t.file_id,
                    t.seq as i64,
                    t.tile.x as i64,
                    t.tile.y as i64,
                    t.tile.w as i64,
                    t.tile.h as i64,
                    t.tile.edge,
                    (self.rows + i as u64) as i64,
                    b(0),
                    b(1),
                    b(2),
                    b(3),
                ])
                .map_err(db)?;
            }
        }
        for id in done {
            tx.execute("UPDATE files SET done = 1 WHERE id = ?1", [id])
                .map_err(db)?;
        }
        let rows = self.rows + tiles.len() as u64;
        set_meta(&tx, "rows", &rows.to_string()).map_err(db)?;
        bump_revision(&tx).map_err(db)?;
        tx.commit().map_err(db)?;
        self.rows = rows;
        Ok(())
    }

    /// Record that a file could not be read (it is skipped until it changes).
    pub fn fail_file(&mut self, file_id: i64, error: &str) -> Result<()> {
        let dir = self.dir.clone();
        let db = |e| db_err(&dir, e);
        let tx = self.conn.transaction().map_err(db)?;
        tx.execute(
            "UPDATE files SET done = 1, error = ?2 WHERE id = ?1",
            params![file_id, error],
        )
        .map_err(db)?;
        bump_revision(&tx).map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Committed rows and the rows tiles name (the rest belong to removed or changed files).
    pub fn row_counts(&self) -> Result<(u64, u64)> {
        let live: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM tiles", [], |r| r.get(0))
            .map_err(|e| self.db(e))?;
        Ok((self.rows, live as u64))
    }

    /// Rewrite the vectors without the rows no tile names, if they are at least a quarter of
    /// the file. Returns the rows removed.
    pub fn compact(&mut self) -> Result<u64> {
        let (rows, live) = self.row_counts()?;
        if rows == live || (rows - live) * 4 < rows {
            return Ok(0);
        }
        let dim = self.settings.dim;
        let old = vectors_name(self.generation);
        let new = vectors_name(self.generation + 1);
        let new_path = self.dir.join(&new);
        let order: Vec<(i64, i64)> = {
            let mut st = self
                .conn
                .prepare("SELECT id, row FROM tiles ORDER BY row")
                .map_err(|e| self.db(e))?;
            let it = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(|e| self.db(e))?;
            it.collect::<rusqlite::Result<_>>()
                .map_err(|e| self.db(e))?
        };
        // read the old rows one at a time and append the live ones to the new file
        {
            let mut out = std::io::BufWriter::new(
                File::create(&new_path).map_err(|e| Error::io(&new_path, e))?,
            );
            let mut buf = vec![0u8; dim * 4];
            let old_path = self.dir.join(&old);
            for &(id, row) in &order {
                if !(0..self.rows as i64).contains(&row) {
                    return Err(Error::Index {
                        path: self.dir.display().to_string(),
                        msg: format!(
                            "tile {id} names vector row {row}, outside the {} committed rows: \
                             the index is damaged; rebuild it",
                            self.rows
                        ),
                    });
                }
                self.vectors
                    .seek(SeekFrom::Start(row as u64 * dim as u64 * 4))
                    .and_then(|_| self.vectors.read_exact(&mut buf))
                    .map_err(|e| Error::io(&old_path, e))?;
                out.write_all(&buf).map_err(|e| Error::io(&new_path, e))?;
            }
            let f = out
                .into_inner()
                .map_err(|e| Error::io(&new_path, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&new_path, e))?;
        }
        let dir = self.dir.clone();
        let db = |e| db_err(&dir, e);
        let tx = self.conn.transaction().map_err(db)?;
        {
            // rows are UNIQUE: move them out of the way first
            tx.execute("UPDATE tiles SET row = -1 - row", [])
                .map_err(db)?;
            let mut st = tx
                .prepare("UPDATE tiles SET row = ?2 WHERE id = ?1")
                .map_err(db)?;
            for (new_row, (id, _)) in order.iter().enumerate() {
                st.execute(params![*id, new_row as i64]).map_err(db)?;
            }
        }
        set_meta(&tx, "generation", &(self.generation + 1).to_string()).map_err(db)?;
        set_meta(&tx, "rows", &live.to_string()).map_err(db)?;
        bump_revision(&tx).map_err(db)?;
        tx.commit().map_err(db)?;
        self.generation += 1;
        self.rows = live;
        self.vectors = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&new_path)
            .map_err(|e| Error::io(&new_path, e))?;
        remove_leftovers(&self.dir, &new)?;
        Ok(rows - live)
    }
}

/// Remove vector files other than `keep` (left by an interrupted compaction).
fn remove_leftovers(dir: &Path, keep: &str) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("vectors-") && name.ends_with(".f32") && name != keep {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(&e.path(), err))?;
        }
    }
    Ok(())
}

/// The embeddings of the live tiles, in memory: row r of `data` belongs to tile `ids[r]`.
#[derive(Debug, Clone, Default)]
pub struct Vectors {
    pub dim: usize,
    pub data: Vec<f32>,
    pub ids: Vec<i64>,
}

impl Vectors {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The vector of tile `id`, if it is live.
    pub fn get(&self, id: i64) -> Option<&[f32]> {
        let r = self.ids.iter().position(|&i| i == id)?;
        Some(&self.data[r * self.dim..(r + 1) * self.dim])
    }
}

/// A tile as stored, with its file's size and modification time when it was indexed (what
/// `harma serve` compares with the file on disk before reading it).
#[derive(Debug, Clone, PartialEq)]
pub struct TileSource {
    pub tile: TileInfo,
    pub size: i64,
    pub mtime_ns: i64,
}

/// The largest pixel offset or size a stored tile may have (a raster side fits in a u32).
const MAX_PIXELS: i64 = u32::MAX as i64;

/// Tile `id`, read and checked: a damaged or tampered row (a negative, zero or huge box, an
/// unknown edge) is an error naming the tile, never a value that wraps.
fn read_tile(conn: &Connection, dir: &Path, id: i64) -> Result<Option<TileSource>> {
    type Raw = (String, [i64; 5], [Option<f64>; 4], Option<String>, i64, i64);
    let raw: Option<Raw> = conn
        .prepare_cached(
            "SELECT f.path, t.x, t.y, t.w, t.h, t.edge, t.min_x, t.min_y, t.max_x, t.max_y,
                    f.geo, f.size, f.mtime_ns
             FROM tiles t JOIN files f ON f.id = t.file_id WHERE t.id = ?1",
        )
        .and_then(|mut st| {
            st.query_row([id], |r| {
                Ok((
                    r.get(0)?,
                    [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
                    [r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?],
                    r.get(10)?,
                    r.get(11)?,
                    r.get(12)?,
                ))
            })
            .optional()
        })
        .map_err(|e| db_err(dir, e))?;
    let Some((file, [x, y, w, h, edge], b, geo, size, mtime_ns)) = raw else {
        return Ok(None);
    };
    let offsets = 0..=MAX_PIXELS;
    let sides = 1..=MAX_PIXELS;
    if !(offsets.contains(&x)
        && offsets.contains(&y)
        && sides.contains(&w)
        && sides.contains(&h)
        && (0..=3).contains(&edge))
    {
        return Err(Error::Index {
            path: dir.display().to_string(),
            msg: format!(
                "tile {id} of {file} has the box x={x} y={y} w={w} h={h} edge={edge}, \
                 not one a build writes: the index is damaged; rebuild it"
            ),
        });
    }
    let geo: Option<GeoRef> = geo.and_then(|g| serde_json::from_str(&g).ok());
    Ok(Some(TileSource {
        tile: TileInfo {
            id,
            file,
            tile: Tile {
                x: x as usize,
                y: y as usize,
                w: w as usize,
                h: h as usize,
                edge: edge as u8,
            },
            // a box that is not finite (written by an older build, or tampered) is no box
            bbox: match b {
                [Some(a), Some(b), Some(c), Some(d)]
                    if [a, b, c, d].iter().all(|v| v.is_finite()) =>
                {
                    Some([a, b, c, d])
                }
                _ => None,
            },
            epsg: geo.and_then(|g| g.epsg),
        },
        size,
        mtime_ns,
    }))
}

/// The tiles `ids`, in the same order; one missing is an error naming it.
fn read_tiles(conn: &Connection, dir: &Path, ids: &[i64]) -> Result<Vec<TileInfo>> {
    ids.iter()
        .map(|&id| {
            read_tile(conn, dir, id)?
                .map(|s| s.tile)
                .ok_or_else(|| Error::Index {
                    path: dir.display().to_string(),
                    msg: format!(
                        "tile {id} has a vector but no tile or file row (the index changed \
                         since its vectors were read, or it is damaged): search again, or \
                         rebuild the index"
                    ),
                })
        })
        .collect()
}

/// The live tiles' vectors as of `conn`'s transaction. Every row number is checked against
/// the committed rows, and the vector file's length against them, before a byte is read.
fn read_vectors(conn: &Connection, dir: &Path) -> Result<Vectors> {
    let db = |e| db_err(dir, e);
    let bad = |msg: String| Error::Index {
        path: dir.display().to_string(),
        msg,
    };
    let (settings, generation, rows) = read_state(conn, dir)?;
    let dim = settings.dim;
    let pairs: Vec<(i64, i64)> = {
        let mut st = conn
            .prepare("SELECT id, row FROM tiles ORDER BY row")
            .map_err(db)?;
        let it = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?;
        it.collect::<rusqlite::Result<_>>().map_err(db)?
    };
    for (k, &(id, row)) in pairs.iter().enumerate() {
        if row < 0 || row as u64 >= rows {
            return Err(bad(format!(
                "tile {id} names vector row {row}, outside the {rows} committed rows: the index \
                 is damaged; rebuild it"
            )));
        }
        if k > 0 && pairs[k - 1].1 == row {
            return Err(bad(format!(
                "tiles {} and {id} name the same vector row {row}: the index is damaged; \
                 rebuild it",
                pairs[k - 1].0
            )));
        }
    }
    if pairs.is_empty() {
        return Ok(Vectors {
            dim,
            data: Vec::new(),
            ids: Vec::new(),
        });
    }
    let row_bytes = (dim as u64)
        .checked_mul(4)
        .ok_or_else(|| bad(format!("an embedding size of {dim} overflows")))?;
    let path = dir.join(vectors_name(generation));
    let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
    match rows.checked_mul(row_bytes) {
        Some(committed) if committed <= len => {}
        _ => {
            return Err(bad(format!(
                "{} holds {len} bytes, fewer than {rows} rows of {dim} floats: the vector file \
                 was cut or the index is damaged; rebuild it",
                path.display()
            )))
        }
    }
    // every row is below `rows`, so no offset below overflows and all lie in the file
    let mut data = Vec::with_capacity(pairs.len() * dim);
    let mut ids = Vec::with_capacity(pairs.len());
    // rows are sorted: read runs of consecutive rows at once
    let mut buf = Vec::new();
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i + 1;
        while j < pairs.len() && pairs[j].1 == pairs[j - 1].1 + 1 && j - i < 65536 {
            j += 1;
        }
        buf.resize((j - i) * dim * 4, 0);
        f.seek(SeekFrom::Start(pairs[i].1 as u64 * row_bytes))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| Error::io(&path, e))?;
        data.extend(
            buf.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        );
        ids.extend(pairs[i..j].iter().map(|p| p.0));
        i = j;
    }
    Ok(Vectors { dim, data, ids })
}

/// An index opened for reading.
pub struct Index {
    pub dir: PathBuf,
    conn: Connection,
    pub settings: Settings,
}

/// One consistent state of an index (a read transaction): its revision, vectors and tiles
/// all as of one commit, whatever a build commits meanwhile.
pub struct View<'a> {
    tx: rusqlite::Transaction<'a>,
    dir: &'a Path,
}

impl View<'_> {
    /// `meta.revision`: bumped by every commit that changes files or tiles.
    pub fn revision(&self) -> Result<u64> {
        let v = get_meta(&self.tx, "revision").map_err(|e| db_err(self.dir, e))?;
        match v {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| Error::Index {
                path: self.dir.display().to_string(),
                msg: format!("unreadable `revision` record `{v}`: rebuild the index"),
            }),
        }
    }

    /// The live tiles' vectors.
    pub fn vectors(&self) -> Result<Vectors> {
        read_vectors(&self.tx, self.dir)
    }

    /// The tiles `ids`, in the same order; an id without its tile or file row is an error
    /// naming it.
    pub fn tiles(&self, ids: &[i64]) -> Result<Vec<TileInfo>> {
        read_tiles(&self.tx, self.dir, ids)
    }

    /// Counts for a summary: files, of which unreadable, and tiles.
    pub fn counts(&self) -> Result<(u64, u64, u64)> {
        counts(&self.tx, self.dir)
    }
}

fn counts(conn: &Connection, dir: &Path) -> Result<(u64, u64, u64)> {
    conn.query_row(
        "SELECT (SELECT COUNT(*) FROM files), (SELECT COUNT(*) FROM files WHERE error IS NOT NULL),
                (SELECT COUNT(*) FROM tiles)",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        },
    )
    .map_err(|e| db_err(dir, e))
}

impl Index {
    /// Open the index in `dir` read-only.
    pub fn open(dir: &Path) -> Result<Index> {
        if !dir.join(DB).is_file() {
            return Err(Error::Index {
                path: dir.display().to_string(),
                msg: "no index here (it has no index.sqlite): build one with `harma index build`"
                    .into(),
            });
        }
        let conn = open_conn(dir, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| db_err(dir, e))?;
        if tables == 0 {
            return Err(Error::Index {
                path: dir.display().to_string(),
                msg: "index.sqlite holds no index (its creation was interrupted): rerun \
                      `harma index build`"
                    .into(),
            });
        }
        let (settings, ..) = read_state(&conn, dir)?;
        Ok(Index {
            dir: dir.to_path_buf(),
            conn,
            settings,
        })
    }

    /// A consistent view of the index, until it is dropped.
    pub fn view(&mut self) -> Result<View<'_>> {
        let Index { dir, conn, .. } = self;
        let tx = conn.transaction().map_err(|e| db_err(dir, e))?;
        Ok(View { tx, dir })
    }

    /// `f` on a consistent view of the index. A compaction may remove the vector file a view
    /// names before the view reads it: then `f` runs again on a newer view (3 tries in all).
    pub fn read<T>(&mut self, mut f: impl FnMut(&View) -> Result<T>) -> Result<T> {
        let mut tries = 1;
        loop {
            let view = self.view()?;
            match f(&view) {
                Err(Error::Io { path, source })
                    if tries < 3
                        && source.kind() == std::io::ErrorKind::NotFound
                        && path.ends_with(".f32") =>
                {
                    tries += 1
                }
                r => return r,
            }
        }
    }

    /// The live tiles' vectors (one consistent snapshot: the committed rows and the tiles that
    /// name them, read in one transaction).
    pub fn vectors(&mut self) -> Result<Vectors> {
        self.read(|v| v.vectors())
    }

    /// The stored tiles among `ids`, in the same order; an id without its tile or file row is
    /// an error naming it. (For tiles that go with vectors, read both from one [`View`].)
    pub fn tiles(&self, ids: &[i64]) -> Result<Vec<TileInfo>> {
        read_tiles(&self.conn, &self.dir, ids)
    }

    /// Tile `id` and its file's recorded size and time, if the index holds it; a damaged row
    /// is an error.
    pub fn tile(&self, id: i64) -> Result<Option<TileSource>> {
        read_tile(&self.conn, &self.dir, id)
    }

    /// Counts for a summary: files, of which unreadable, and tiles.
    pub fn counts(&self) -> Result<(u64, u64, u64)> {
        counts(&self.conn, &self.dir)
    }
}
