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

const HELLO: &[u8; 10] = b"HARMA-RDV1";

fn write_u64(s: &mut TcpStream, v: u64) -> std::io::Result<()> {
    s.write_all(&v.to_le_bytes())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
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
    /// A rank that does not come in time, comes twice or expects another world is an error.
    pub fn meet(
        rank: usize,
        world: usize,
        addr: &str,
        blob: Vec<u8>,
        timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        if rank == 0 {
            let listener = TcpListener::bind(addr).with_context(|| {
                format!("rank 0 cannot listen on {addr} (MASTER_ADDR:MASTER_PORT)")
            })?;
            listener.set_nonblocking(true)?;
            let mut links: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while links.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false)?;
                        s.set_nodelay(true).ok();
                        s.set_read_timeout(Some(timeout))?;
                        let mut hello = [0u8; 10];
                        s.read_exact(&mut hello)
                            .with_context(|| format!("a connection from {from} said nothing"))?;
                        if &hello != HELLO {
                            bail!("{from} is not a harma rank (it connected to {addr})");
                        }
                        let (r, w) = (read_u64(&mut s)? as usize, read_u64(&mut s)? as usize);
                        if w != world {
                            bail!("rank {r} (from {from}) expects a world of {w}, not {world}");
                        }
                        match links.get_mut(r.wrapping_sub(1)) {
                            Some(slot @ None) => *slot = Some(s),
                            Some(Some(_)) => bail!("rank {r} connected twice (from {from})"),
                            None => bail!("rank {r} (from {from}) is not in a world of {world}"),
                        }
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
            }
            let mut links: Vec<TcpStream> = links.into_iter().flatten().collect();
            for s in &mut links {
                write_u64(s, blob.len() as u64)?;
                s.write_all(&blob)?;
                s.set_read_timeout(None)?;
            }
            return Ok(Self {
                rank,
                world,
                links,
                blob,
            });
        }
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
        s.write_all(HELLO)?;
        write_u64(&mut s, rank as u64)?;
        write_u64(&mut s, world as u64)?;
        s.set_read_timeout(Some(timeout))?;
        let n = read_u64(&mut s).context("rank 0 closed the rendezvous")? as usize;
        if n > 1 << 20 {
            bail!("rank 0 sent a rendezvous blob of {n} bytes");
        }
        let mut blob = vec![0u8; n];
        s.read_exact(&mut blob)?;
        s.set_read_timeout(None)?;
        Ok(Self {
            rank,
            world,
            links: vec![s],
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

fn recv(s: &mut TcpStream, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
    let n = read_u64(s)? as usize;
    if n != shapes.len() {
        bail!("expected {} tensors, a rank sent {n}", shapes.len());
    }
    let mut out = Vec::with_capacity(n);
    for shape in shapes {
        let code = read_u64(s)?;
        let rank = read_u64(s)? as usize;
        if rank > 8 {
            bail!("a tensor of rank {rank} on the wire");
        }
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(read_u64(s)? as usize);
        }
        // a rank's tensor has the shape this rank expects, but for the gathered first dim
        if dims.len() != shape.len() || dims.get(1..) != shape.get(1..) {
            bail!("a rank sent a tensor of shape {dims:?}, expected like {shape:?}");
        }
        let numel: usize = dims.iter().product();
        let mut bytes = vec![0u8; numel * 8 / if code == 0 { 2 } else { 1 }];
        s.read_exact(&mut bytes)?;
        let t = match code {
            0 => {
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                Tensor::from_vec(v, dims, &Device::Cpu)?
            }
            1 => {
                let v: Vec<i64> = bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                Tensor::from_vec(v, dims, &Device::Cpu)?
            }
            other => bail!("unknown dtype code {other} on the wire"),
        };
        out.push(t);
    }
    Ok(out)
}

/// A collective over the rendezvous' connections: every rank sends its tensors to rank 0,
/// which combines them (concatenated, or summed in rank order) and sends the result back.
pub struct Tcp {
    rank: usize,
    world: usize,
    links: Mutex<Vec<TcpStream>>,
}

impl Tcp {
    pub fn new(rdv: Rendezvous) -> Self {
        Self {
            rank: rdv.rank,
            world: rdv.world,
            links: Mutex::new(rdv.into_links()),
        }
    }

    /// `mine` to rank 0; there, `combine` of every rank's (by rank) is sent back to all.
    fn round(
        &self,
        mine: Vec<Tensor>,
        combine: impl FnOnce(&[Vec<Tensor>]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| anyhow::anyhow!("the collective's lock is poisoned"))?;
        let shapes: Vec<Vec<usize>> = mine.iter().map(|t| t.dims().to_vec()).collect();
        if self.rank != 0 {
            let hub = &mut links[0];
            send(hub, &mine).context("lost rank 0 (it stopped?)")?;
            let result_shapes: Vec<Vec<usize>> = shapes.clone();
            return recv(hub, &result_shapes).context("lost rank 0 (it stopped?)");
        }
        let mut all = vec![mine
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?];
        for (i, link) in links.iter_mut().enumerate() {
            all.push(
                recv(link, &shapes)
                    .with_context(|| format!("lost rank {} (it stopped?)", i + 1))?,
            );
        }
        let result = combine(&all)?;
        for (i, link) in links.iter_mut().enumerate() {
            send(link, &result).with_context(|| format!("lost rank {}", i + 1))?;
        }
        Ok(result)
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
        let out = self.round(vec![x.clone()], |all| Ok(vec![gathered(all)?]))?;
        Ok(out[0].to_device(x.device())?)
    }

    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let out = self.round(xs.to_vec(), summed)?;
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
                        let rdv = Rendezvous::meet(rank, 3, &addr, blob, Duration::from_secs(20))?;
                        let got = rdv.blob.clone();
                        let t = Tcp::new(rdv);
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
            vec![],
            Duration::from_millis(300),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("ranks 1 that never came"), "{err}");
        Ok(())
    }
}
