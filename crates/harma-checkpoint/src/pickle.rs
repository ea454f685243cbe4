//! A safe reader for PyTorch's zip checkpoints (`torch.save`): it interprets the pickle
//! without executing anything, keeps every object it does not understand as an opaque
//! node, and extracts the tensors of the state dict.
//!
//! Format: <https://github.com/pytorch/pytorch/blob/main/torch/serialization.py> (zip layout,
//! `persistent_id` tuples) and Python's `Lib/pickletools.py` (opcodes). Unlike
//! `candle_core::pickle`, a dict subclass such as ruamel.yaml's `CommentedMap` beside the
//! weights (HarMA's checkpoints carry one) is read as an object and ignored.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

type Id = usize;

#[derive(Debug, Clone)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set,
    Global(String, String),
    /// The result of calling `callable(*args)` (REDUCE, NEWOBJ), with what was added later.
    Object {
        callable: Id,
        args: Id,
        items: Vec<(Id, Id)>,
    },
    Persistent(Id),
}

#[derive(Clone, Copy)]
enum Slot {
    Mark,
    Node(Id),
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: HashMap<u32, Id>,
    what: String,
}

impl<'a> Unpickler<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Checkpoint(format!("{}: pickle byte {}: {msg}", self.what, self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => end,
            _ => return Err(self.err("unexpected end of data (truncated file?)")),
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A length argument of 8 bytes, as a `usize` (a length beyond the data fails in `take`).
    fn len64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err(format!("length {n} out of range")))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            return Err(self.err("unterminated text argument"));
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    fn node(&mut self, n: Node) -> Id {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn push(&mut self, n: Node) {
        let id = self.node(n);
        self.stack.push(Slot::Node(id));
    }

    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(Slot::Node(id)) => Ok(id),
            Some(Slot::Mark) => Err(self.err("unexpected mark on the stack")),
            None => Err(self.err("stack underflow")),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(Slot::Node(id)) => Ok(*id),
            _ => Err(self.err("expected an object on the stack")),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let mut items = Vec::new();
        loop {
            match self.stack.pop() {
                Some(Slot::Mark) => break,
                Some(Slot::Node(id)) => items.push(id),
                None => return Err(self.err("no mark on the stack")),
            }
        }
        items.reverse();
        Ok(items)
    }

    fn memoize(&mut self, key: u32) -> Result<()> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn get(&mut self, key: u32) -> Result<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(format!("memo key {key} missing")))?;
        self.stack.push(Slot::Node(id));
        Ok(())
    }

    fn set_items(&mut self, target: Id, kv: Vec<Id>) -> Result<()> {
        let pairs: Vec<(Id, Id)> = kv.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        match &mut self.nodes[target] {
            Node::Dict(items) | Node::Object { items, .. } => items.extend(pairs),
            _ => return Err(self.err("SETITEMS on an object that is not a mapping")),
        }
        Ok(())
    }

    fn append(&mut self, target: Id, values: Vec<Id>) -> Result<()> {
        match &mut self.nodes[target] {
            Node::List(items) => items.extend(values),
            // list subclasses: keep nothing, they never hold tensors of the state dict
            Node::Object { .. } => {}
            _ => return Err(self.err("APPENDS on an object that is not a list")),
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'}' => self.push(Node::Dict(vec![])),
                b']' => self.push(Node::List(vec![])),
                b')' => self.push(Node::Tuple(vec![])),
                0x8f => self.push(Node::Set),
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'(' => self.stack.push(Slot::Mark),
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memoize(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memoize(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memoize(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.get(k)?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len64()?,
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.push(Node::Str(s))
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.push(Node::Str(s))
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len64()?,
                    };
                    self.take(n)?;
                    self.push(Node::Bytes)
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Node::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.push(Node::Int(v as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, b) in bytes.iter().enumerate().take(8) {
                        v |= (*b as i64) << (8 * i);
                    }
                    if (1..8).contains(&n) && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Node::Int(v))
                }
                b'G' => {
                    // floats (configs, hyper-parameters) never hold tensors: skip the value
                    self.take(8)?;
                    self.push(Node::Float)
                }
                b'I' | b'L' => {
                    let s = self.line()?;
                    let s = s.trim_end_matches('L');
                    let node = match s {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => Node::Int(s.parse().map_err(|_| self.err("bad INT literal"))?),
                    };
                    self.push(node)
                }
                b'F' => {
                    let s = self.line()?;
                    s.parse::<f64>()
                        .map_err(|_| self.err("bad FLOAT literal"))?;
                    self.push(Node::Float)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Node::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (m, n) = match (&self.nodes[module], &self.nodes[name]) {
                        (Node::Str(m), Node::Str(n)) => (m.clone(), n.clone()),
                        _ => return Err(self.err("STACK_GLOBAL expects two strings")),
                    };
                    self.push(Node::Global(m, n))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))
                }
                b'd' => {
                    let kv = self.pop_mark()?;
                    let pairs = kv.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    self.push(Node::Dict(pairs))
                }
                0x91 => {
                    self.pop_mark()?;
                    self.push(Node::Set)
                }
                0x90 => {
                    self.pop_mark()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Node::Persistent(pid))
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Node::Object {
                        callable,
                        args,
                        items: vec![],
                    })
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Node::Object {
                        callable,
                        args,
                        items: vec![],
                    })
                }
                b'b' => {
                    // BUILD sets an object's state: a state dict never lives there
                    self.pop()?;
                    self.top()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![k, v])?
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    let target = self.top()?;
                    self.set_items(target, kv)?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.append(target, vec![v])?
                }
                b'e' => {
                    let values = self.pop_mark()?;
                    let target = self.top()?;
                    self.append(target, values)?
                }
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(Slot::Node(id))
                }
                other => {
                    self.pos -= 1;
                    return Err(self.err(format!("unsupported pickle opcode 0x{other:02x}")));
                }
            }
        }
    }
}

/// Where one tensor's data lives in the archive and how to view it.
struct TensorRef {
    storage_key: String,
    dtype: &'static str,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// How deep `_rebuild_parameter` wrappers may nest (PyTorch writes one).
const MAX_WRAPPING: usize = 4;

struct Graph {
    nodes: Vec<Node>,
}

impl Graph {
    fn str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    fn int(&self, id: Id) -> Option<i64> {
        match &self.nodes[id] {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    fn tuple(&self, id: Id) -> Option<&[Id]> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    fn ints(&self, id: Id) -> Option<Vec<i64>> {
        self.tuple(id)?.iter().map(|&i| self.int(i)).collect()
    }

    fn global(&self, id: Id) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Global(m, n) => Some((m, n)),
            _ => None,
        }
    }

    /// The (key, value) pairs of a dict or dict-like object (OrderedDict, CommentedMap).
    fn mapping(&self, id: Id) -> Option<&[(Id, Id)]> {
        match &self.nodes[id] {
            Node::Dict(items) | Node::Object { items, .. } => Some(items),
            _ => None,
        }
    }

    /// The tensor an object rebuilds, looking through at most `depth` parameter wrappers (a
    /// crafted pickle can make an object its own argument).
    fn tensor(&self, id: Id, depth: usize) -> Option<TensorRef> {
        let Node::Object { callable, args, .. } = &self.nodes[id] else {
            return None;
        };
        let args = self.tuple(*args)?;
        match self.global(*callable)? {
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => {
                self.tensor(*args.first()?, depth.checked_sub(1)?)
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, type, args, state): the tensor is func(*args)
                let inner = self.tuple(*args.get(2)?)?;
                self.rebuild_v2(*args.first()?, inner)
            }
            _ => self.rebuild_v2(*callable, args),
        }
    }

    fn rebuild_v2(&self, callable: Id, args: &[Id]) -> Option<TensorRef> {
        if self.global(callable)? != ("torch._utils", "_rebuild_tensor_v2") {
            return None;
        }
        let Node::Persistent(pid) = &self.nodes[*args.first()?] else {
            return None;
        };
        // ('storage', storage_type, key, location, numel)
        let pid = self.tuple(*pid)?;
        let (_, storage_type) = self.global(*pid.get(1)?)?;
        Some(TensorRef {
            storage_key: self.str(*pid.get(2)?)?.to_string(),
            dtype: match storage_type {
                "FloatStorage" => "f32",
                "HalfStorage" => "f16",
                "BFloat16Storage" => "bf16",
                "DoubleStorage" => "f64",
                "LongStorage" => "i64",
                "IntStorage" => "i32",
                "ByteStorage" | "BoolStorage" => "u8",
                _ => "unknown",
            },
            offset: self.int(*args.get(1)?)?,
            size: self.ints(*args.get(2)?)?,
            stride: self.ints(*args.get(3)?)?,
        })
    }

    fn tensors_of(&self, id: Id) -> Vec<(String, TensorRef)> {
        let Some(items) = self.mapping(id) else {
            return vec![];
        };
        items
            .iter()
            .filter_map(|&(k, v)| Some((self.str(k)?.to_string(), self.tensor(v, MAX_WRAPPING)?)))
            .collect()
    }
}

/// Element size in bytes of a storage dtype tag.
fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "f64" | "i64" => 8,
        "f32" | "i32" => 4,
        "f16" | "bf16" => 2,
        _ => 1,
    }
}

/// Decode one element at `i` of a little-endian storage to f64.
fn element(bytes: &[u8], dtype: &str, i: usize) -> f64 {
    let s = dtype_size(dtype);
    let b = &bytes[i * s..(i + 1) * s];
    match dtype {
        "f32" => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        "f64" => f64::from_le_bytes(b.try_into().unwrap()),
        "f16" => half::f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        "bf16" => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        "i64" => i64::from_le_bytes(b.try_into().unwrap()) as f64,
        "i32" => i32::from_le_bytes(b.try_into().unwrap()) as f64,
        _ => b[0] as f64,
    }
}

/// A tensor's view of its storage, checked: sizes and strides as `usize`, the element count,
/// and the elements it reads all inside the storage of `storage_elems` elements. A view
/// reading more elements than its storage holds (a zero stride expanding a few bytes to
/// gigabytes) is refused: state dicts do not hold expanded tensors.
struct View {
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
    numel: usize,
}

impl View {
    fn check(t: &TensorRef, storage_elems: usize) -> std::result::Result<Self, String> {
        let non_neg =
            |v: i64, what: &str| usize::try_from(v).map_err(|_| format!("negative {what} {v}"));
        if t.size.len() != t.stride.len() {
            return Err(format!(
                "{} sizes but {} strides",
                t.size.len(),
                t.stride.len()
            ));
        }
        let offset = non_neg(t.offset, "storage offset")?;
        let size = t
            .size
            .iter()
            .map(|&v| non_neg(v, "size"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let stride = t
            .stride
            .iter()
            .map(|&v| non_neg(v, "stride"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let too_big = || format!("shape {:?} is too large", t.size);
        let numel = size
            .iter()
            .try_fold(1usize, |n, &s| n.checked_mul(s))
            .ok_or_else(too_big)?;
        if numel > 0 {
            // the last element read: offset + sum (size - 1) * stride
            let last = size
                .iter()
                .zip(&stride)
                .try_fold(offset, |acc, (&s, &st)| {
                    acc.checked_add((s - 1).checked_mul(st)?)
                })
                .ok_or_else(too_big)?;
            if last >= storage_elems {
                return Err(format!(
                    "reads element {last} of a storage of {storage_elems} (truncated file?)"
                ));
            }
            if numel > storage_elems {
                return Err(format!(
                    "shape {:?} has {numel} elements but its storage {storage_elems} (an \
                     expanded tensor, stride 0?)",
                    t.size
                ));
            }
        }
        Ok(Self {
            offset,
            size,
            stride,
            numel,
        })
    }

    fn contiguous(&self) -> bool {
        let mut expect = 1usize;
        let mut ok = true;
        for (s, st) in self.size.iter().zip(&self.stride).rev() {
            ok &= *s <= 1 || *st == expect;
            expect = expect.saturating_mul(*s);
        }
        ok
    }
}

/// Read a storage view into an f32 tensor (integer tensors become I64).
fn materialise(bytes: &[u8], t: &TensorRef, name: &str, what: &str) -> Result<Tensor> {
    let v = View::check(t, bytes.len() / dtype_size(t.dtype))
        .map_err(|e| Error::Checkpoint(format!("{what}: tensor `{name}`: {e}")))?;
    if v.contiguous() && t.dtype == "f32" {
        let b = &bytes[v.offset * 4..(v.offset + v.numel) * 4];
        let values: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        return Ok(Tensor::from_vec(values, v.size.as_slice(), &Device::Cpu)?);
    }
    let mut values = Vec::with_capacity(v.numel);
    let mut index = vec![0usize; v.size.len()];
    for _ in 0..v.numel {
        // inside the storage: every index is below its size (checked in `View::check`)
        let off = v.offset
            + index
                .iter()
                .zip(&v.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        values.push(element(bytes, t.dtype, off));
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < v.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let tensor = if matches!(t.dtype, "i64" | "i32") {
        let values: Vec<i64> = values.iter().map(|&x| x as i64).collect();
        Tensor::from_vec(values, v.size.as_slice(), &Device::Cpu)?
    } else {
        let values: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(values, v.size.as_slice(), &Device::Cpu)?
    };
    Ok(tensor)
}

/// Keys under which a training script may have wrapped the state dict.
const WRAPPER_KEYS: &[&str] = &["state_dict", "model", "module", "model_state_dict"];

/// The largest `data.pkl` read (a state dict's pickle is kilobytes: one small record per
/// tensor; HarMA's, with its config, about 100 KB). Its interpretation takes memory in
/// proportion, so this bounds the memory a crafted pickle can take.
pub const MAX_PICKLE_BYTES: u64 = 8 << 20;

/// How many times the elements of its storages the tensors of a file may hold together
/// (tied weights share a storage); more is a crafted file multiplying one storage.
const MAX_REUSE: usize = 4;

/// One archive member, whole: at most `max` bytes, stored uncompressed unless `compressed_ok`,
/// and exactly as long as the archive declares (a member that inflates beyond its declared
/// size, or is cut short, is refused).
fn read_entry<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    max: u64,
    compressed_ok: bool,
    what: &str,
) -> Result<Vec<u8>> {
    let fail = |e: String| Error::Checkpoint(format!("{what}: member {name}: {e}"));
    let f = zip.by_name(name).map_err(|e| fail(e.to_string()))?;
    if !compressed_ok && f.compression() != zip::CompressionMethod::Stored {
        return Err(fail(format!(
            "compressed ({}); torch.save stores tensors uncompressed: re-save the checkpoint \
             with torch.save",
            f.compression()
        )));
    }
    let declared = f.size();
    if declared > max {
        return Err(fail(format!(
            "declares {declared} bytes, more than the {max} allowed"
        )));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    f.take(declared + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("{e} (truncated or corrupt file?)")))?;
    if bytes.len() as u64 != declared {
        return Err(fail(format!(
            "holds {} bytes, the archive declares {declared}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Read every tensor of the state dict in a `torch.save` zip archive: the top-level dict if it
/// holds tensors, otherwise the first of `state_dict`, `model`, `module` that does.
/// Anything else in the file (configs, optimiser states, custom classes) is skipped unread.
pub fn read_torch_zip(path: &Path) -> Result<HashMap<String, Tensor>> {
    let what = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        Error::Checkpoint(format!(
            "{what}: not a readable PyTorch zip archive ({e}); truncated download?"
        ))
    })?;
    let names: Vec<String> = zip.file_names().map(String::from).collect();
    if names.iter().any(|n| n.ends_with("/constants.pkl")) {
        return Err(Error::Checkpoint(format!(
            "{what}: a TorchScript archive, not a state dict; load it in PyTorch and save \
             `model.state_dict()` with torch.save, or use the open_clip/Hugging Face weights"
        )));
    }
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| Error::Checkpoint(format!("{what}: no data.pkl in the archive")))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let data = read_entry(&mut zip, &pkl, MAX_PICKLE_BYTES, true, &what)?;

    let mut up = Unpickler {
        data: &data,
        pos: 0,
        nodes: vec![],
        stack: vec![],
        memo: HashMap::new(),
        what: format!("{what} ({pkl})"),
    };
    let root = up.run()?;
    let graph = Graph { nodes: up.nodes };

    let mut refs = graph.tensors_of(root);
    if refs.is_empty() {
        if let Some(items) = graph.mapping(root) {
            for key in WRAPPER_KEYS {
                if let Some(&(_, v)) = items.iter().find(|(k, _)| graph.str(*k) == Some(key)) {
                    refs = graph.tensors_of(v);
                    if !refs.is_empty() {
                        break;
                    }
                }
            }
        }
    }
    if refs.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{what}: found no state dict of tensors (looked at the top level and under {})",
            WRAPPER_KEYS.join(", ")
        )));
    }

    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = HashMap::with_capacity(refs.len());
    // elements of the storages read so far, and of the tensors made from them
    let (mut stored, mut made) = (0usize, 0usize);
    for (name, t) in refs {
        if t.dtype == "unknown" {
            continue;
        }
        if !storages.contains_key(&t.storage_key) {
            // stored members: none can be larger than the file that holds them
            let entry = format!("{prefix}data/{}", t.storage_key);
            let bytes = read_entry(&mut zip, &entry, file_len, false, &what)?;
            stored += bytes.len() / dtype_size(t.dtype);
            storages.insert(t.storage_key.clone(), bytes);
        }
        let tensor = materialise(&storages[&t.storage_key], &t, &name, &what)?;
        made += tensor.elem_count();
        if made > MAX_REUSE.saturating_mul(stored) {
            return Err(Error::Checkpoint(format!(
                "{what}: its tensors hold more than {MAX_REUSE} times the elements of its \
                 storages (at `{name}`): a storage shared by too many tensors"
            )));
        }
        out.insert(name, tensor);
    }
    Ok(out)
}
