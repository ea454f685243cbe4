//! Crafted and corrupted checkpoints: the readers never panic, never take more than a memory
//! budget, and every error names the file. Thousands of seeded mutations of the committed
//! fixture checkpoints (bit flips, bytes set to extremes, truncations, length fields and
//! integers of the pickle set to extremes, safetensors headers altered), and hand-made files
//! for each way a file was found to hurt the reader.
//!
//! Its own test binary: the global allocator counts this process's memory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use harma_clip::{Checkpoint, ClipConfig};
use harma_kernels::runtime::CountingAlloc;

#[global_allocator]
static MEMORY: CountingAlloc = CountingAlloc::new();

/// The most a load may take above what was live before it (the fixtures are at most 2.4 MB).
const BUDGET: usize = 64 << 20;

/// The counter sees every thread of the process: the tests take turns, or one test's
/// allocations would be counted against another's load.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn adapter_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-adapters/tests/fixtures")
}

/// SplitMix64: seeded, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// What happened when a file was loaded.
#[derive(Debug)]
enum Outcome {
    Loaded,
    Refused(String),
}

/// Load `path` the ways the project does (raw tensors, and a checked backbone for `cfg`, or
/// HarMA's adapters without `cfg`), failing the test on a panic, on memory beyond the budget,
/// or on an error that does not name the file.
fn load(path: &Path, cfg: Option<&ClipConfig>, case: &str) -> Outcome {
    let before = MEMORY.live();
    MEMORY.reset_peak();
    let result = std::panic::catch_unwind(|| {
        let raw = harma_checkpoint::format::load_tensors(path).map_err(|e| e.to_string());
        let checked = match cfg {
            Some(cfg) => Checkpoint::load(path, cfg, &harma_adapters::is_adapter_key)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => harma_adapters::load_file(path)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        (raw.map(|_| ()), checked)
    });
    let used = MEMORY.peak().saturating_sub(before);
    assert!(
        used <= BUDGET,
        "{case}: loading took {} MB (budget {} MB)",
        used >> 20,
        BUDGET >> 20
    );
    let (raw, checked) = result.unwrap_or_else(|_| panic!("{case}: the reader panicked"));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut refused = None;
    for e in [raw.err(), checked.err()].into_iter().flatten() {
        assert!(
            e.contains(&name),
            "{case}: the error does not name the file: {e}"
        );
        refused.get_or_insert(e);
    }
    match refused {
        Some(e) => Outcome::Refused(e),
        None => Outcome::Loaded,
    }
}

fn members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            f.read_to_end(&mut b).unwrap();
            (f.name().to_string(), b)
        })
        .collect()
}

/// A zip of `members`, stored (as torch.save writes it), or deflated where `deflate` says.
fn zip_of(members: &[(String, Vec<u8>)], deflate: &dyn Fn(&str) -> bool) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in members {
        let method = if deflate(name) {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .large_file(bytes.len() > u32::MAX as usize / 2);
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// One random change to `bytes`.
fn mutate(bytes: &mut Vec<u8>, rng: &mut Rng) {
    const EXTREMES: [u8; 5] = [0x00, 0xFF, 0x7F, 0x80, 0xFE];
    if bytes.is_empty() {
        bytes.push(rng.next() as u8);
        return;
    }
    match rng.below(6) {
        // a few bit flips
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
        }
        // a byte set to an extreme
        1 => {
            let i = rng.below(bytes.len());
            bytes[i] = EXTREMES[rng.below(EXTREMES.len())];
        }
        // a field of 1 to 8 bytes set to an extreme (a length, an integer, an offset)
        2 => {
            let width = [1, 2, 4, 8][rng.below(4)];
            let i = rng.below(bytes.len());
            let fill = EXTREMES[rng.below(EXTREMES.len())];
            for b in bytes.iter_mut().skip(i).take(width) {
                *b = fill;
            }
        }
        // cut short
        3 => bytes.truncate(rng.below(bytes.len())),
        // a span removed
        4 => {
            let i = rng.below(bytes.len());
            let n = 1 + rng.below(64).min(bytes.len() - i - 1);
            bytes.drain(i..(i + n).min(bytes.len()));
        }
        // random bytes inserted
        _ => {
            let i = rng.below(bytes.len());
            let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
            bytes.splice(i..i, junk);
        }
    }
}

/// Where the pickle stores its lengths and integers: a random position right after one of
/// the opcodes that take one (BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, BINBYTES8, BININT,
/// BININT1, BININT2, LONG1, LONG4, FRAME), so that mutations hit the fields the reader trusts.
fn field_position(pickle: &[u8], rng: &mut Rng) -> Option<usize> {
    const OPS: [u8; 10] = [b'X', 0x8c, 0x8d, 0x8e, b'J', b'K', b'M', 0x8a, 0x8b, 0x95];
    let at: Vec<usize> = (0..pickle.len().saturating_sub(1))
        .filter(|&i| OPS.contains(&pickle[i]))
        .collect();
    (!at.is_empty()).then(|| at[rng.below(at.len())] + 1)
}

/// A mutation of a torch zip that reaches past the archive: its pickle or a storage changed,
/// and the archive written anew (valid checksums), so that the reader's own checks are hit.
fn mutate_torch_zip(original: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut m = members(original);
    let pkl = m.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    match rng.below(4) {
        0 | 1 => mutate(&mut m[pkl].1, rng),
        2 => {
            // a length or integer field set to an extreme
            if let Some(i) = field_position(&m[pkl].1, rng) {
                let fill = [0x00u8, 0xFF, 0x7F, 0x80][rng.below(4)];
                let p = &mut m[pkl].1;
                let end = (i + [1, 2, 4, 8][rng.below(4)]).min(p.len());
                p[i..end].fill(fill);
            }
        }
        _ => {
            // a storage cut short or grown
            let storages: Vec<usize> = (0..m.len())
                .filter(|&i| m[i].0.contains("/data/"))
                .collect();
            if !storages.is_empty() {
                let s = storages[rng.below(storages.len())];
                let b = &mut m[s].1;
                if rng.below(2) == 0 {
                    b.truncate(rng.below(b.len().max(1)));
                } else {
                    b.extend((0..rng.below(4096)).map(|_| rng.next() as u8));
                }
            }
        }
    }
    zip_of(&m, &|_| false)
}

/// A mutation of a safetensors file aimed at its header: the length prefix, or a number in
/// the JSON (an offset or a dimension).
fn mutate_safetensors(original: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = original.to_vec();
    match rng.below(3) {
        0 => {
            let extremes = [0u64, 1, 7, u64::MAX, u64::MAX / 2, 1 << 40, b.len() as u64];
            b[..8].copy_from_slice(&extremes[rng.below(extremes.len())].to_le_bytes());
        }
        1 => {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let digits: Vec<usize> = (8..8 + n.min(b.len() - 8))
                .filter(|&i| b[i].is_ascii_digit())
                .collect();
            if !digits.is_empty() {
                let i = digits[rng.below(digits.len())];
                let big = [
                    "99999999999999999999",
                    "4294967296",
                    "0",
                    "18446744073709551615",
                ];
                let with = big[rng.below(big.len())].as_bytes();
                b.splice(i..i + 1, with.iter().copied());
                // the length prefix follows the longer header, so the JSON is what is read
                let grown = (n + with.len() - 1) as u64;
                b[..8].copy_from_slice(&grown.to_le_bytes());
            }
        }
        _ => mutate(&mut b, rng),
    }
    b
}

/// The fixture checkpoints and the configs they are for (none: adapters only).
fn fixture_files() -> Vec<(PathBuf, Option<ClipConfig>)> {
    let tiny = ClipConfig::preset(fixtures().join("tiny/config.json").to_str().unwrap()).unwrap();
    let small =
        ClipConfig::preset(adapter_fixtures().join("config.json").to_str().unwrap()).unwrap();
    let mut v: Vec<(PathBuf, Option<ClipConfig>)> = [
        "plain.pt",
        "wrapped.pth",
        "harma_style.pth",
        "open_clip.safetensors",
        "hf_transformers.safetensors",
    ]
    .iter()
    .map(|f| (fixtures().join("tiny").join(f), Some(tiny.clone())))
    .collect();
    v.push((adapter_fixtures().join("harma.pth"), Some(small)));
    v.push((adapter_fixtures().join("adapters.safetensors"), None));
    v
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-hostile-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn thousands_of_mutated_checkpoints_neither_panic_nor_exceed_the_budget() {
    let _turn = one_at_a_time();
    let dir = temp_dir("mutations");
    let (mut cases, mut refused, mut worst) = (0usize, 0usize, 0usize);
    for (file, cfg) in fixture_files() {
        let original = std::fs::read(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // the fixture itself loads
        assert!(
            matches!(load(&file, cfg.as_ref(), &name), Outcome::Loaded),
            "{name}"
        );
        let is_zip = original.starts_with(b"PK");
        let target = dir.join(&name);
        let mut rng = Rng(0x5EED ^ cases as u64);
        for i in 0..330 {
            let bytes = match (i % 3, is_zip) {
                (0, _) => {
                    let mut b = original.clone();
                    mutate(&mut b, &mut rng);
                    b
                }
                (_, true) => mutate_torch_zip(&original, &mut rng),
                (_, false) => mutate_safetensors(&original, &mut rng),
            };
            std::fs::write(&target, &bytes).unwrap();
            let before = MEMORY.live();
            MEMORY.reset_peak();
            let case = format!("{name} mutation {i}");
            if let Outcome::Refused(_) = load(&target, cfg.as_ref(), &case) {
                refused += 1;
            }
            worst = worst.max(MEMORY.peak().saturating_sub(before));
            cases += 1;
        }
    }
    eprintln!(
        "{cases} mutated checkpoints: {refused} refused with an error naming the file, the \
         rest loaded; none panicked; largest load {:.1} MB (budget {} MB)",
        worst as f64 / 1e6,
        BUDGET >> 20
    );
    assert!(cases >= 2000 && refused > cases / 4);
    std::fs::remove_dir_all(dir).ok();
}

/// A pickle written by hand: protocol 2, a dict of one tensor `w` rebuilt from storage `0`.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }

    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn str(self, s: &str) -> Self {
        let mut b = vec![b'X'];
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
        self.op(&b)
    }

    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }

    /// An integer as LONG1 with 8 bytes (any i64).
    fn int(self, v: i64) -> Self {
        let mut b = vec![0x8a, 8];
        b.extend(v.to_le_bytes());
        self.op(&b)
    }

    fn ints(mut self, v: &[i64]) -> Self {
        self = self.op(b"(");
        for &x in v {
            self = self.int(x);
        }
        self.op(b"t")
    }

    /// `{"w": _rebuild_tensor_v2(storage 0 of `numel` floats, offset, size, stride)}`.
    fn tensor(offset: i64, size: &[i64], stride: &[i64], numel: i64) -> Vec<u8> {
        Self::new()
            .op(b"}(")
            .str("w")
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", "FloatStorage")
            .str("0")
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(size)
            .ints(stride)
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")RtRu.")
            .0
    }
}

/// A torch zip of a pickle and the storages named `0`, `1`, ...
fn torch_zip(pickle: Vec<u8>, storages: &[Vec<u8>], deflate: bool) -> Vec<u8> {
    let mut m = vec![("archive/data.pkl".to_string(), pickle)];
    for (i, s) in storages.iter().enumerate() {
        m.push((format!("archive/data/{i}"), s.clone()));
    }
    zip_of(&m, &|n: &str| deflate && n.contains("/data/"))
}

#[test]
fn each_crafted_checkpoint_is_refused_with_a_clear_error() {
    let _turn = one_at_a_time();
    let dir = temp_dir("crafted");
    let cfg = ClipConfig::preset(fixtures().join("tiny/config.json").to_str().unwrap()).unwrap();
    let floats = |n: usize| vec![0u8; 4 * n];
    let length_op = |op: u8, n: u64| {
        let mut p = vec![0x80, 2, op];
        p.extend(n.to_le_bytes());
        p.extend_from_slice(b"abc.");
        p
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "binbytes8-2^64",
            torch_zip(length_op(0x8e, u64::MAX), &[], false),
            "pickle byte",
        ),
        (
            "binunicode8-2^64",
            torch_zip(length_op(0x8d, u64::MAX - 2), &[], false),
            "pickle byte",
        ),
        (
            "negative-offset",
            torch_zip(Pickle::tensor(-8, &[2], &[1], 4), &[floats(4)], false),
            "negative storage offset",
        ),
        (
            "negative-stride",
            torch_zip(Pickle::tensor(3, &[2, 2], &[-1, 1], 4), &[floats(4)], false),
            "negative stride",
        ),
        (
            // 642 bytes that asked for 8 TB
            "zero-stride-huge",
            torch_zip(
                Pickle::tensor(0, &[1 << 20, 1 << 21], &[0, 0], 1),
                &[floats(1)],
                false,
            ),
            "expanded tensor",
        ),
        (
            "shape-overflow",
            torch_zip(
                Pickle::tensor(0, &[1 << 40, 1 << 40], &[1, 1], 4),
                &[floats(4)],
                false,
            ),
            "too large",
        ),
        (
            "past-the-storage",
            torch_zip(Pickle::tensor(2, &[4], &[1], 4), &[floats(4)], false),
            "reads element",
        ),
        (
            // 64 MB of zeros in a few kilobytes
            "deflate-bomb",
            torch_zip(
                Pickle::tensor(0, &[1 << 24], &[1], 1 << 24),
                &[floats(1 << 24)],
                true,
            ),
            "compressed",
        ),
    ];
    for (name, bytes, want) in cases {
        let path = dir.join(format!("{name}.pt"));
        std::fs::write(&path, &bytes).unwrap();
        match load(&path, Some(&cfg), name) {
            Outcome::Refused(e) => assert!(e.contains(want), "{name}: {e}"),
            Outcome::Loaded => panic!("{name}: loaded"),
        }
        eprintln!("{name} ({} bytes): refused", bytes.len());
    }
    // a parameter that wraps itself (through a list it is appended to) ends, refused
    let p = Pickle::new()
        .op(b"}(")
        .str("w")
        .global("torch._utils", "_rebuild_parameter")
        .op(b"]q\x01")
        .op(b"Rq\x02")
        .op(b"h\x01h\x02a0")
        .op(b"u.")
        .0;
    let path = dir.join("self-wrapping.pt");
    std::fs::write(&path, torch_zip(p, &[], false)).unwrap();
    match load(&path, Some(&cfg), "self-wrapping") {
        Outcome::Refused(e) => assert!(e.contains("no state dict"), "{e}"),
        Outcome::Loaded => panic!("self-wrapping: loaded"),
    }
    std::fs::remove_dir_all(dir).ok();
}
