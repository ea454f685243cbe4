//! [`Nccl`]: the collective of multi-GPU runs, through NCCL (cudarc's bindings, as Candle
//! enables them), one process per GPU. The ranks meet over TCP at rank 0's address, which
//! hands them NCCL's unique id; the connections then serve as a watchdog, so that a rank of
//! another machine that dies brings this one down instead of leaving it waiting in NCCL.

use std::io::Read;
use std::sync::{mpsc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};

use super::launch::Role;
use super::tcp::Rendezvous;
use super::Collective;

/// What the communicator's thread is asked to do.
enum Op {
    Gather(Tensor),
    Sum(Vec<Tensor>),
}

struct Request {
    op: Op,
    reply: mpsc::Sender<Result<Vec<Tensor>>>,
}

/// NCCL's communicator on a thread of its own (cudarc's `Comm` may not move between threads),
/// on the stream Candle computes on, so collectives and compute keep their order.
pub struct Nccl {
    rank: usize,
    world: usize,
    /// The GPU of the communicator (tensors given elsewhere are moved there and back).
    device: Device,
    requests: Mutex<mpsc::Sender<Request>>,
}

impl Nccl {
    /// Meet the other ranks at `role.master` and build the communicator on `device`.
    pub fn connect(role: &Role, device: &Device) -> Result<Self> {
        let cuda = device
            .as_cuda_device()
            .context("NCCL needs a CUDA device")?
            .clone();
        let (rank, world) = (role.rank, role.world);
        let blob = if rank == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL: cannot make an id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        let rdv = Rendezvous::meet(
            rank,
            world,
            &role.master,
            &role.secret,
            blob,
            super::RENDEZVOUS_TIMEOUT,
        )?;
        if rdv.blob.len() != 128 {
            bail!("rank 0 sent an NCCL id of {} bytes", rdv.blob.len());
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&rdv.blob) {
            *d = *s as std::ffi::c_char;
        }
        watch(rdv, rank);
        let (requests, incoming) = mpsc::channel::<Request>();
        let (ready, is_ready) = mpsc::channel::<Result<()>>();
        std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || {
                let comm =
                    match Comm::from_rank(cuda.cuda_stream(), rank, world, Id::uninit(internal)) {
                        Ok(c) => {
                            ready.send(Ok(())).ok();
                            c
                        }
                        Err(e) => {
                            ready
                                .send(Err(anyhow::anyhow!(
                                    "rank {rank}: NCCL did not start: {e:?}"
                                )))
                                .ok();
                            return;
                        }
                    };
                for req in incoming {
                    req.reply.send(serve(&comm, &cuda, world, req.op)).ok();
                }
            })?;
        is_ready.recv().context("NCCL's thread ended")??;
        if rank == 0 {
            eprintln!("{world} GPU ranks met at {}: NCCL", role.master);
        }
        Ok(Self {
            rank,
            world,
            device: device.clone(),
            requests: Mutex::new(requests),
        })
    }

    fn ask(&self, op: Op) -> Result<Vec<Tensor>> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .lock()
            .map_err(|_| anyhow::anyhow!("NCCL's lock is poisoned"))?
            .send(Request { op, reply })
            .context("NCCL's thread ended")?;
        answer.recv().context("NCCL's thread ended")?
    }
}

/// The rendezvous connections, watched: when one closes (a rank's process died, on any
/// machine), this process ends with a message naming whom it lost.
fn watch(rdv: Rendezvous, rank: usize) {
    for (i, mut link) in rdv.into_links().into_iter().enumerate() {
        let peer = if rank == 0 { i + 1 } else { 0 };
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            // nothing is ever sent on these connections after the rendezvous: a read ends
            // only when the other side is gone
            let _ = link.read(&mut b);
            eprintln!("rank {rank}: lost rank {peer} (it stopped); stopping");
            std::process::exit(1);
        });
    }
}

/// The CUDA slice and element count of a contiguous tensor.
fn slice_of<
    T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
>(
    t: &Tensor,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("NCCL: a tensor is not on the GPU");
    };
    let start = layout.start_offset();
    let n = t.elem_count();
    let all = cs.as_cuda_slice::<T>()?;
    Ok(all.stream().clone_dtod(&all.slice(start..start + n))?)
}

/// A tensor of `shape` over `slice`.
fn tensor_of<T: candle_core::cuda_backend::CudaDType>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    cuda: &CudaDevice,
    shape: Vec<usize>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, cuda.clone()));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

fn serve(comm: &Comm, cuda: &CudaDevice, world: usize, op: Op) -> Result<Vec<Tensor>> {
    let err = |e: candle_core::cuda_backend::cudarc::nccl::result::NcclError| {
        anyhow::anyhow!("NCCL: {e:?}")
    };
    match op {
        Op::Gather(x) => {
            let mut shape = x.dims().to_vec();
            let rows = shape.first().copied().unwrap_or(1);
            shape[0] = rows * world;
            let n = x.elem_count() * world;
            Ok(vec![match x.dtype() {
                DType::F32 => {
                    let src = slice_of::<f32>(&x)?;
                    let mut dst = cuda.alloc_zeros::<f32>(n)?;
                    comm.all_gather(&src, &mut dst).map_err(err)?;
                    tensor_of(dst, cuda, shape)
                }
                DType::I64 => {
                    let src = slice_of::<i64>(&x)?;
                    let mut dst = cuda.alloc_zeros::<i64>(n)?;
                    comm.all_gather(&src, &mut dst).map_err(err)?;
                    tensor_of(dst, cuda, shape)
                }
                other => bail!("NCCL all-gather of {other:?}"),
            }])
        }
        Op::Sum(xs) => {
            // one reduction over all the tensors together, then split back
            let flat: Vec<Tensor> = xs
                .iter()
                .map(|t| t.to_dtype(DType::F32)?.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let all = Tensor::cat(&flat, 0)?;
            let src = slice_of::<f32>(&all)?;
            let mut dst = cuda.alloc_zeros::<f32>(all.elem_count())?;
            comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(err)?;
            let summed = tensor_of(dst, cuda, vec![all.elem_count()]);
            let mut at = 0;
            xs.iter()
                .map(|t| {
                    let n = t.elem_count();
                    let part = summed.narrow(0, at, n)?.reshape(t.dims())?;
                    at += n;
                    Ok(part.to_dtype(t.dtype())?)
                })
                .collect()
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.ask(Op::Gather(x.to_device(&self.device)?))?.remove(0);
        Ok(out.to_device(x.device())?)
    }

    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let moved = xs
            .iter()
            .map(|t| t.to_device(&self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.ask(Op::Sum(moved))?
            .into_iter()
            .zip(xs)
            .map(|(t, x)| Ok(t.to_device(x.device())?))
            .collect()
    }

    fn abort(&self, why: &str) {
        // NCCL cannot be told; the others learn it from this process's exit (the watchdog)
        eprintln!("rank {}: {why}", self.rank);
    }
}
