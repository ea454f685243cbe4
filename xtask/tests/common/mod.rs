//! A small HTTP server on 127.0.0.1 for the xtask tests: it plays the Hugging Face Hub
//! (`resolve` URLs through `HF_ENDPOINT`, the ETag being the file's sha256 as for LFS files),
//! GitHub raw files and release assets, honours ranges (hf-hub asks for them), and misbehaves
//! on request.

#![allow(dead_code)] // each test binary uses the parts it needs

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;

#[derive(Default)]
pub struct State {
    pub files: HashMap<String, Vec<u8>>,
    /// path -> how many more responses stop half-way
    pub broken: HashMap<String, usize>,
    /// paths whose responses announce 100 bytes more than they send
    pub lying: HashSet<String>,
    /// paths served with their first byte changed (the ETag stays the true file's)
    pub corrupt: HashSet<String>,
    /// paths whose Range header is ignored (a 200 with the whole file)
    pub no_ranges: HashSet<String>,
    /// paths sent without a Content-Length (the body ends when the connection closes)
    pub no_length: HashSet<String>,
    /// path -> how many more requests get no answer for 3 s
    pub stalled: HashMap<String, usize>,
    /// path -> headers sent instead of the usual ones of that name
    pub headers: HashMap<String, Vec<(String, String)>>,
    /// (path, first byte asked for, status) of every request but the Hub's one-byte probes
    pub requests: Vec<(String, u64, u16)>,
}

/// Serve `state` on 127.0.0.1 (a thread per connection); returns the base URL.
pub fn serve(state: Arc<Mutex<State>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let state = state.clone();
            std::thread::spawn(move || answer(stream, &state));
        }
    });
    base
}

fn answer(mut stream: std::net::TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
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
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let probe = range == Some((0, Some(0)));
    // the first byte asked for, as recorded (a server that ignores ranges still sends all)
    let asked = range.map_or(0, |r| r.0);
    if st.no_ranges.contains(&path) && !probe {
        range = None;
    }
    if let Some(n) = st.stalled.get_mut(&path).filter(|n| **n > 0) {
        *n -= 1;
        drop(st);
        std::thread::sleep(Duration::from_secs(3));
        return;
    }
    let total = body.len() as u64;
    let etag = format!("{:x}", sha2::Sha256::digest(&body));
    let mut headers = vec![
        ("ETag".to_string(), format!("\"{etag}\"")),
        (
            "X-Repo-Commit".into(),
            "0123456789abcdef0123456789abcdef01234567".into(),
        ),
    ];
    for (k, v) in st.headers.get(&path).cloned().unwrap_or_default() {
        headers.retain(|(h, _)| *h != k);
        headers.push((k, v));
    }
    let headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let start = range.map_or(0, |r| r.0);
    if start >= total && range.is_some() {
        st.requests.push((path, start, 416));
        let _ = stream.write_all(
            format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        return;
    }
    let end = range.and_then(|r| r.1).unwrap_or(total - 1).min(total - 1);
    let mut slice = body[start as usize..=end as usize].to_vec();
    let (mut cut, mut lie, mut no_length) = (false, false, false);
    if !probe {
        st.requests
            .push((path.clone(), asked, if range.is_some() { 206 } else { 200 }));
        if let Some(n) = st.broken.get_mut(&path).filter(|n| **n > 0) {
            *n -= 1;
            cut = true;
        }
        lie = st.lying.contains(&path);
        no_length = st.no_length.contains(&path);
        if st.corrupt.contains(&path) && start == 0 {
            slice[0] ^= 0xff;
        }
    }
    drop(st);
    let (status, content_range) = match range {
        Some(_) => (
            "206 Partial Content",
            format!("Content-Range: bytes {start}-{end}/{total}\r\n"),
        ),
        None => ("200 OK", String::new()),
    };
    let length = if no_length {
        String::new()
    } else {
        format!(
            "Content-Length: {}\r\n",
            slice.len() + if lie { 100 } else { 0 }
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\n{length}{content_range}{headers}\
         Accept-Ranges: bytes\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.write_all(head.as_bytes());
    let send = if cut {
        &slice[..slice.len() / 2]
    } else {
        &slice[..]
    };
    let _ = stream.write_all(send);
    let _ = stream.flush();
}
