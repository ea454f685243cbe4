//! Ranks in separate processes (or machines) meeting over TCP at rank 0's address: the
//! rendezvous every multi-process run starts with (NCCL's id travels over it), and [`Tcp`], a
//! collective through rank 0 for runs on CPUs (and for the launcher's tests on machines
//! without GPUs). On GPUs the tensors go through NCCL instead.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{gathered, summed, Collective};

const HELLO: &[u8; 10] = b"HARMA-RDV2";

/// How long a connecting peer has to complete its handshake with rank 0.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn write_u64(s: &mut TcpStream, v: u64) -> std::io::Result<()> {
    s.write_all(&v.to_le_bytes())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_array<const N: usize>(s: &mut TcpStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// HMAC-SHA256 (RFC 2104) of `parts` concatenated, under `key`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Equal in time independent of where two MACs differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// 16 bytes no one can guess: the operating system's randomness (`/dev/urandom`), else the
/// OS-seeded keys of std's hasher.
pub fn random_bytes() -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(&mut out).is_ok() {
            return out;
        }
    }
    use std::hash::{BuildHasher, Hasher};
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// A new job secret, as hex: what `--nproc`'s launcher hands its workers.
pub fn new_secret() -> String {
    random_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A connection that proved it knows the job's secret: its rank and the stream.
type Joined = (usize, TcpStream);

/// Rank 0's side of one connection's handshake (within [`HANDSHAKE_TIMEOUT`]): a nonce out;
/// the greeting, rank, world, the peer's nonce and its MAC of both nonces, rank and world
/// under the secret back; then rank 0's own MAC of them (so the peer knows rank 0 holds the
/// secret too) and the blob. Anything else, or silence, is refused.
fn admit(mut s: TcpStream, world: usize, secret: &[u8], blob: &[u8]) -> Result<Joined> {
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let nonce = random_bytes();
    s.write_all(HELLO)?;
    s.write_all(&nonce)?;
    let hello: [u8; 10] = read_array(&mut s).context("it said nothing")?;
    if &hello != HELLO {
        bail!("it is not a harma rank");
    }
    let (r, w) = (read_u64(&mut s)?, read_u64(&mut s)?);
    let theirs: [u8; 16] = read_array(&mut s)?;
    let mac: [u8; 32] = read_array(&mut s)?;
    let (rb, wb) = (r.to_le_bytes(), w.to_le_bytes());
    let want = hmac(secret, &[b"rank", &nonce, &theirs, &rb, &wb]);
    if !same(&mac, &want) {
        bail!("it does not know this job's secret (HARMA_DIST_SECRET)");
    }
    if w != world as u64 {
        bail!("rank {r} expects a world of {w}, not {world}");
    }
    if r == 0 || r >= world as u64 {
        bail!("rank {r} is not in a world of {world}");
    }
    s.write_all(&hmac(secret, &[b"rank0", &theirs, &nonce, &rb, &wb]))?;
    write_u64(&mut s, blob.len() as u64)?;
    s.write_all(blob)?;
    Ok((r as usize, s))
}

/// Rank 0's side of [`Rendezvous::meet`]: listen at `addr` until the other `world - 1` ranks
/// have proven the secret (each handshake on its own thread), by `deadline`; the links by
/// rank.
fn host(
    world: usize,
    addr: &str,
    secret: &[u8],
    blob: &[u8],
    (deadline, timeout): (Instant, Duration),
) -> Result<Vec<TcpStream>> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("rank 0 cannot listen on {addr} (MASTER_ADDR:MASTER_PORT)"))?;
    listener.set_nonblocking(true)?;
    let (tx, rx) = std::sync::mpsc::channel::<(String, Result<Joined>)>();
    let mut links: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    while links.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false)?;
                let (tx, secret, blob) = (tx.clone(), secret.to_vec(), blob.to_vec());
                std::thread::spawn(move || {
                    let _ = tx.send((from.to_string(), admit(s, world, &secret, &blob)));
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = links
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rank 0 waited {}s on {addr} for ranks {} that never came",
                        timeout.as_secs(),
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting a rank"),
        }
        while let Ok((from, joined)) = rx.try_recv() {
            match joined {
                Ok((r, s)) => match &mut links[r - 1] {
                    slot @ None => *slot = Some(s),
                    Some(_) => bail!("rank {r} connected twice (from {from})"),
                },
                Err(e) => {
                    eprintln!("warning: rank 0 refused a connection from {from} on {addr}: {e:#}")
                }
            }
        }
    }
    let links: Vec<TcpStream> = links.into_iter().flatten().collect();
    for s in &links {
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
    }
    Ok(links)
}

/// A rank's side of [`Rendezvous::meet`]: connect to rank 0 at `addr` (retrying until
/// `deadline`), prove the secret, check rank 0's proof, and receive the blob.
fn join(
    rank: usize,
    world: usize,
    addr: &str,
    secret: &[u8],
    (deadline, timeout): (Instant, Duration),
) -> Result<(TcpStream, Vec<u8>)> {
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("MASTER_ADDR:MASTER_PORT {addr} does not resolve"))?
        .next()
        .with_context(|| format!("{addr} has no address"))?;
    let mut s = loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "rank {rank} could not reach rank 0 at {addr} in {}s",
                        timeout.as_secs()
                    )
                })
            }
        }
    };
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let hello: [u8; 10] = read_array(&mut s)
        .with_context(|| format!("rank {rank}: {addr} did not greet as rank 0"))?;
    if &hello != HELLO {
        bail!("rank {rank}: {addr} is not a harma rank 0");
    }
    let nonce: [u8; 16] = read_array(&mut s)?;
    let mine = random_bytes();
    let (rb, wb) = ((rank as u64).to_le_bytes(), (world as u64).to_le_bytes());
    s.write_all(HELLO)?;
    s.write_all(&rb)?;
    s.write_all(&wb)?;
    s.write_all(&mine)?;
    s.write_all(&hmac(secret, &[b"rank", &nonce, &mine, &rb, &wb]))?;
    let proof: [u8; 32] = read_array(&mut s).with_context(|| {
        format!(
            "rank {rank}: rank 0 at {addr} refused this rank (another job's secret, world \
             or rank? its log says why)"
        )
    })?;
    if !same(&proof, &hmac(secret, &[b"rank0", &mine, &nonce, &rb, &wb])) {
        bail!("rank {rank}: {addr} does not know this job's secret: not our rank 0");
    }
    let n = read_u64(&mut s).context("rank 0 closed the rendezvous")? as usize;
    if n > 1 << 20 {
        bail!("rank 0 sent a rendezvous blob of {n} bytes");
    }
    let mut blob = vec![0u8; n];
    s.read_exact(&mut blob)?;
    s.set_read_timeout(None)?;
    Ok((s, blob))
}

/// The connections of a run: rank 0 holds one to every other rank (by rank, from 1), every
/// other rank one to rank 0.
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    links: Vec<TcpStream>,
    /// What rank 0 handed every rank when they met (NCCL's unique id, or nothing).
    pub blob: Vec<u8>,
}

impl Rendezvous {
    /// Meet at `addr` (`host:port`): rank 0 listens there and waits for the other `world - 1`
    /// ranks, the others connect, retrying until `timeout`; rank 0's `blob` reaches them all.
    /// Every peer proves that it holds `secret` before it is counted (and rank 0 proves it to
    /// the peer); a connection that does not, or stays silent, is dropped with a warning and
    /// does not delay the others (each handshake runs on its own thread). A rank that does not
    /// come in time, or comes twice, is an error.
    pub fn meet(
        rank: usize,
        world: usize,
        addr: &str,
        secret: &str,
        blob: Vec<u8>,
        timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        if secret.is_empty() {
            bail!("rank {rank}: the job's secret is empty (HARMA_DIST_SECRET)");
        }
        let secret = secret.as_bytes();
        let (links, blob) = if rank == 0 {
            (host(world, addr, secret, &blob, (deadline, timeout))?, blob)
        } else {
            let (s, blob) = join(rank, world, addr, secret, (deadline, timeout))?;
            (vec![s], blob)
        };
        Ok(Self {
            rank,
            world,
            links,
            blob,
        })
    }

    /// The connections, for a watchdog or a collective.
    pub fn into_links(self) -> Vec<TcpStream> {
        self.links
    }
}

/// Tensors on the wire: a count, then for each its dtype (0: f32, 1: i64), rank, dims and
/// little-endian elements.
fn send(s: &mut TcpStream, tensors: &[Tensor]) -> Result<()> {
    let mut buf = Vec::new();
    buf.extend((tensors.len() as u64).to_le_bytes());
    for t in tensors {
        let dims = t.dims().to_vec();
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let code: u64 = match t.dtype() {
            DType::F32 => 0,
            DType::I64 => 1,
            other => bail!("tcp collective: {other:?} tensors are not sent"),
        };
        buf.extend(code.to_le_bytes());
        buf.extend((dims.len() as u64).to_le_bytes());
        for d in &dims {
            buf.extend((*d as u64).to_le_bytes());
        }
        match code {
            0 => buf.extend(t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes())),
            _ => buf.extend(t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes())),
        }
    }
    s.write_all(&buf)?;
    Ok(())
}

/// What a tensor on the wire must be: its dtype and shape.
type Expected = (DType, Vec<usize>);

/// The dtype and shape of each of `tensors`.
fn expected(tensors: &[Tensor]) -> Vec<Expected> {
    tensors
        .iter()
        .map(|t| (t.dtype(), t.dims().to_vec()))
        .collect()
}

/// Tensors from `s`, each of exactly the dtype and shape `want` says, checked before anything
/// is allocated for it: a peer cannot make this rank reserve more than the step exchanges.
fn recv(s: &mut TcpStream, want: &[Expected]) -> Result<Vec<Tensor>> {
    let n = read_u64(s)?;
    if n != want.len() as u64 {
        bail!("expected {} tensors, a rank sent {n}", want.len());
    }
    let mut out = Vec::with_capacity(want.len());
    for (dtype, shape) in want {
        let code = read_u64(s)?;
        let (want_code, size) = match dtype {
            DType::F32 => (0, 4),
            DType::I64 => (1, 8),
            other => bail!("tcp collective: {other:?} tensors are not received"),
        };
        if code != want_code {
            bail!("a rank sent a tensor of dtype code {code}, expected {dtype:?}");
        }
        let rank = read_u64(s)?;
        if rank != shape.len() as u64 {
            bail!("a rank sent a tensor of rank {rank}, expected shape {shape:?}");
        }
        for &d in shape {
            let got = read_u64(s)?;
            if got != d as u64 {
                bail!("a rank sent a tensor with a dimension of {got}, expected shape {shape:?}");
            }
        }
        let numel: usize = shape.iter().product();
        let mut bytes = vec![0u8; numel * size];
        s.read_exact(&mut bytes)?;
        let t = if *dtype == DType::F32 {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
        } else {
            let v: Vec<i64> = bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
        };
        out.push(t);
    }
    Ok(out)
}

/// A collective over the rendezvous' connections: every rank sends its tensors to rank 0,
/// which combines them (concatenated, or summed in rank order) and sends the result back.
/// Every read waits at most its timeout: a rank that falls silent is an error naming it, not
/// a hang.
pub struct Tcp {
    rank: usize,
    world: usize,
    links: Mutex<Vec<TcpStream>>,
}

impl Tcp {
    /// The collective over `rdv`'s connections; `timeout` bounds every read (a step, or rank
    /// 0's evaluation while the others wait, must take less).
    pub fn new(rdv: Rendezvous, timeout: Duration) -> Result<Self> {
        let (rank, world) = (rdv.rank, rdv.world);
        let links = rdv.into_links();
        for l in &links {
            l.set_read_timeout(Some(timeout))?;
        }
        Ok(Self {
            rank,
            world,
            links: Mutex::new(links),
        })
    }

    /// `mine` to rank 0; there, `combine` of every rank's (by rank), which must be like
    /// `result`, is sent back to all.
    fn round(
        &self,
        mine: Vec<Tensor>,
        result: Vec<Expected>,
        combine: impl FnOnce(&[Vec<Tensor>]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| anyhow::anyhow!("the collective's lock is poisoned"))?;
        let like_mine = expected(&mine);
        if self.rank != 0 {
            let hub = &mut links[0];
            send(hub, &mine).context("lost rank 0 (it stopped?)")?;
            return recv(hub, &result).context("lost rank 0 (it stopped, or fell silent?)");
        }
        let mut all = vec![mine
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?];
        for (i, link) in links.iter_mut().enumerate() {
            all.push(
                recv(link, &like_mine).with_context(|| {
                    format!("lost rank {} (it stopped, or fell silent?)", i + 1)
                })?,
            );
        }
        let out = combine(&all)?;
        for (i, link) in links.iter_mut().enumerate() {
            send(link, &out).with_context(|| format!("lost rank {}", i + 1))?;
        }
        Ok(out)
    }
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        // every rank gathers a shard of the same shape: the result is `world` of them
        let mut dims = x.dims().to_vec();
        anyhow::ensure!(!dims.is_empty(), "tcp collective: gathering a scalar");
        dims[0] *= self.world;
        let result = vec![(x.dtype(), dims)];
        let out = self.round(vec![x.clone()], result, |all| Ok(vec![gathered(all)?]))?;
        Ok(out[0].to_device(x.device())?)
    }

    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let out = self.round(xs.to_vec(), expected(xs), summed)?;
        out.into_iter()
            .zip(xs)
            .map(|(t, x)| Ok(t.to_device(x.device())?))
            .collect()
    }

    fn abort(&self, _why: &str) {
        if let Ok(links) = self.links.lock() {
            for l in links.iter() {
                l.shutdown(std::net::Shutdown::Both).ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a rank saw: the rendezvous blob, a gather of rows, of ids, and a mean.
    type Seen = (Vec<u8>, Vec<f32>, Vec<i64>, Vec<f32>);

    #[test]
    fn ranks_meet_and_exchange_over_tcp() -> Result<()> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let results: Vec<Result<Seen>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || -> Result<_> {
                        let blob = if rank == 0 { b"id".to_vec() } else { vec![] };
                        let rdv =
                            Rendezvous::meet(rank, 3, &addr, "job", blob, Duration::from_secs(20))?;
                        let got = rdv.blob.clone();
                        let t = Tcp::new(rdv, Duration::from_secs(20))?;
                        let x = Tensor::new(&[rank as f32, 10.0 * rank as f32], &Device::Cpu)?;
                        let g = t
                            .all_gather(&x.reshape((1, 2))?)?
                            .flatten_all()?
                            .to_vec1()?;
                        let ids = Tensor::new(&[rank as i64], &Device::Cpu)?;
                        let ids = t.all_gather(&ids)?.to_vec1()?;
                        let s = Tensor::new(rank as f32, &Device::Cpu)?;
                        let r = t.all_reduce_mean(&[x, s])?;
                        assert_eq!(r[1].to_scalar::<f32>()?, 1.0);
                        let m = r[0].to_vec1()?;
                        Ok((got, g, ids, m))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let (blob, g, ids, m) = r?;
            assert_eq!(blob, b"id");
            assert_eq!(g, [0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
            assert_eq!(ids, [0, 1, 2]);
            assert_eq!(m, [1.0, 10.0]);
        }
        // a rank that never comes is named
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let err = Rendezvous::meet(
            0,
            2,
            &format!("127.0.0.1:{port}"),
            "job",
            vec![],
            Duration::from_millis(300),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("ranks 1 that never came"), "{err}");
        Ok(())
    }

    /// Who may join: a peer with another job's secret, one that sends garbage, and one that
    /// connects and says nothing are refused (with a warning), and none of them delays the
    /// real rank 1; a rank 0 that does not know the secret is refused by the peer.
    #[test]
    fn only_ranks_with_the_jobs_secret_join_and_impostors_delay_no_one() -> Result<()> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        let (zero, one, impostor) = std::thread::scope(|s| {
            let a = addr.clone();
            let zero = s.spawn(move || {
                Rendezvous::meet(0, 2, &a, "job", b"x".to_vec(), Duration::from_secs(20))
            });
            // wait until rank 0 listens, then the hostile peers come first
            while TcpStream::connect(&addr).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _silent = TcpStream::connect(&addr).unwrap();
            let mut garbage = TcpStream::connect(&addr).unwrap();
            garbage.write_all(&[0xff; 8]).unwrap();
            let a = addr.clone();
            let impostor = s
                .spawn(move || {
                    Rendezvous::meet(1, 2, &a, "another job", vec![], Duration::from_secs(3))
                })
                .join()
                .unwrap();
            let a = addr.clone();
            let one =
                s.spawn(move || Rendezvous::meet(1, 2, &a, "job", vec![], Duration::from_secs(20)));
            (zero.join().unwrap(), one.join().unwrap(), impostor)
        });
        let (zero, one) = (zero?, one?);
        assert_eq!((zero.links.len(), one.blob.as_slice()), (1, &b"x"[..]));
        let err = format!("{:#}", impostor.err().expect("the impostor is refused"));
        assert!(err.contains("refused this rank"), "{err}");
        // the silent connection did not hold the others up for its handshake's timeout
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT,
            "{:?}",
            started.elapsed()
        );

        // a rank 0 without the secret: the peer refuses it
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let a = listener.local_addr()?.to_string();
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(HELLO).unwrap();
            s.write_all(&[7; 16]).unwrap();
            let _ = read_array::<{ 10 + 16 + 16 + 32 }>(&mut s);
            s.write_all(&[0; 32]).unwrap();
            write_u64(&mut s, 0).unwrap();
        });
        let err = Rendezvous::meet(1, 2, &a, "job", vec![], Duration::from_secs(5)).err();
        fake.join().unwrap();
        let err = format!("{:#}", err.expect("a fake rank 0 is refused"));
        assert!(err.contains("not our rank 0"), "{err}");
        Ok(())
    }

    /// After meeting: a tensor announced larger than the step exchanges is refused before
    /// anything is allocated for it, and a rank that falls silent is an error naming it once
    /// the timeout passes, not a hang.
    #[test]
    fn frames_are_checked_and_silence_times_out() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut client = TcpStream::connect(listener.local_addr()?)?;
        let (mut server, _) = listener.accept()?;
        // one f32 tensor of 2^40 x 4 where [2, 4] is expected
        for v in [1u64, 0, 2, 1 << 40, 4] {
            write_u64(&mut client, v)?;
        }
        let err = recv(&mut server, &[(DType::F32, vec![2, 4])]).unwrap_err();
        assert!(err.to_string().contains("expected shape [2, 4]"), "{err}");
        // (a fresh connection: the refused frame's rest is still in the other)
        let mut client = TcpStream::connect(listener.local_addr()?)?;
        let (mut server, _) = listener.accept()?;
        for v in [1u64, 1, 2, 2, 4] {
            write_u64(&mut client, v)?;
        }
        let err = recv(&mut server, &[(DType::F32, vec![2, 4])]).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");

        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let (zero, _one) = std::thread::scope(|s| {
            let a = addr.clone();
            let one =
                s.spawn(move || Rendezvous::meet(1, 2, &a, "job", vec![], Duration::from_secs(20)));
            let zero = Rendezvous::meet(0, 2, &addr, "job", vec![], Duration::from_secs(20));
            (zero, one.join().unwrap())
        });
        let t = Tcp::new(zero?, Duration::from_millis(300))?;
        let started = Instant::now();
        let err = t
            .all_gather(&Tensor::new(&[1f32], &Device::Cpu)?)
            .unwrap_err();
        assert!(format!("{err:#}").contains("lost rank 1"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
        Ok(())
    }
}
