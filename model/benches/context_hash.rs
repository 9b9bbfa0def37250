//! Build-context hashing benchmark (harness = false):
//! `cargo bench -p dbuild-coordinator --bench context_hash`.
//!
//! Generates a context of ~1 GiB in ~20k files under the system temp dir (4 large files hold
//! most bytes; ~20k small files of 0-12 KiB in 400 directories). `DBUILD_BENCH_SCALE=0.1`
//! shrinks both the file count and the bytes. Prints a Markdown table. The files were just
//! written, so every "cold" number is cold for dbuild (no stat cache) but *warm for the OS
//! page cache*: it measures hashing and walking, not the disk.
use model::context::{scan, ScanOptions};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: f64 = (1u64 << 30) as f64;

struct Row {
    what: String,
    /// Whether bytes / time is meaningful (false when nothing was read).
    rate: bool,
    files: usize,
    bytes: u64,
    time: Duration,
}

fn main() {
    let scale: f64 = std::env::var("DBUILD_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0);
    let tmp = tempfile::Builder::new()
        .prefix("dbuild-context-bench-")
        .tempdir_in(std::env::temp_dir())
        .expect("temp dir");
    let ctx = tmp.path().join("ctx");
    let started = Instant::now();
    let (files, bytes) = generate(&ctx, scale);
    eprintln!(
        "generated {files} files, {:.0} MiB in {:.1?} under {}",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed(),
        ctx.display()
    );
    // Flush the fresh dirty pages so writeback does not compete with the first scans, and
    // let every mtime age past the stat cache's racy margin so the warm scan can trust all.
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(2100));

    let mut rows = Vec::new();
    let no_cache = ScanOptions::default();

    let (time, m) = median_of(3, || timed(|| scan(&ctx, &no_cache).expect("scan")));
    rows.push(Row {
        what: "cold scan, no stat cache (median of 3)".into(),
        rate: true,
        files: m.1.files,
        bytes: m.1.bytes,
        time,
    });

    let big = ctx.join("big");
    let (time, mb) = median_of(3, || timed(|| scan(&big, &no_cache).expect("scan")));
    rows.push(Row {
        what: "cold scan, large files only (median of 3)".into(),
        rate: true,
        files: mb.1.files,
        bytes: mb.1.bytes,
        time,
    });

    let cached = ScanOptions {
        dockerfile: None,
        stat_cache: Some(tmp.path().join("data/stat-cache.bin")),
    };
    let (time, first) = timed(|| scan(&ctx, &cached).expect("scan"));
    assert_eq!(first.1.hashed_files, first.1.files);
    rows.push(Row {
        what: "cold scan writing a new stat cache".into(),
        rate: true,
        files: first.1.files,
        bytes: first.1.bytes,
        time,
    });

    let (time, warm) = median_of(5, || timed(|| scan(&ctx, &cached).expect("scan")));
    assert_eq!(warm.1.stat_cache_hits, warm.1.files, "warm scan must hit");
    assert_eq!(warm.0, m.0, "warm manifest equals cold manifest");
    rows.push(Row {
        what: format!(
            "warm scan, stat cache, no changes (median of 5; hashed {} files)",
            warm.1.hashed_files
        ),
        rate: false,
        files: warm.1.files,
        bytes: warm.1.bytes,
        time,
    });

    let paths: Vec<PathBuf> =
        m.0.iter()
            .filter(|e| e.digest().is_some())
            .map(|e| ctx.join(&e.path))
            .collect();
    let (time, _) = timed(|| single_thread_read_hash(&paths));
    rows.push(Row {
        what: "1 thread: read (1 MiB buffer) + blake3::Hasher::update".into(),
        rate: true,
        files: paths.len(),
        bytes: m.1.bytes,
        time,
    });
    let (time, _) = timed(|| {
        for p in &paths {
            blake3::Hasher::new().update_mmap(p).expect("mmap hash");
        }
    });
    rows.push(Row {
        what: "1 thread: blake3 update_mmap".into(),
        rate: true,
        files: paths.len(),
        bytes: m.1.bytes,
        time,
    });

    println!(
        "\ncontext: {files} files, {:.2} GiB (scale {scale}); {} CPUs; OS page cache warm\n",
        bytes as f64 / GIB,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| measurement | files | MiB | time | throughput |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        let secs = r.time.as_secs_f64();
        let rate = if r.rate {
            format!("{:.2} GB/s", r.bytes as f64 / secs / 1e9)
        } else {
            "n/a".to_string()
        };
        println!(
            "| {} | {} | {:.0} | {:.1} ms | {rate} |",
            r.what,
            r.files,
            r.bytes as f64 / (1 << 20) as f64,
            secs * 1e3,
        );
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed(), out)
}

/// Runs `f` `n` times; returns the median duration and the last result.
fn median_of<T>(n: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut times = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        let (t, v) = f();
        eprintln!("  run: {t:.1?}");
        times.push(t);
        last = Some(v);
    }
    times.sort();
    (times[n / 2], last.expect("n > 0"))
}

fn single_thread_read_hash(paths: &[PathBuf]) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for p in paths {
        let mut f = fs::File::open(p).expect("open");
        let mut h = blake3::Hasher::new();
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        std::hint::black_box(h.finalize());
    }
    total
}

/// xorshift64* filler: incompressible bytes, fast to produce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes the context; returns (files, bytes).
fn generate(ctx: &Path, scale: f64) -> (usize, u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let small_count = ((20_000.0 * scale) as usize).max(1);
    let total_target = (GIB * scale) as u64;
    let mut small_bytes = 0u64;
    let mut buf = vec![0u8; 12 << 10];
    for i in 0..small_count {
        let dir = ctx.join(format!("small/d{:02}/e{:02}", i % 20, (i / 20) % 20));
        if i < 400 {
            fs::create_dir_all(&dir).expect("mkdir");
        }
        let len = (rng.next() % (12 << 10) as u64) as usize;
        rng.fill(&mut buf[..len]);
        fs::write(dir.join(format!("f{i:05}.txt")), &buf[..len]).expect("write");
        small_bytes += len as u64;
    }
    let big_count = 4;
    let big_len = total_target.saturating_sub(small_bytes) / big_count;
    fs::create_dir_all(ctx.join("big")).expect("mkdir");
    let mut block = vec![0u8; 8 << 20];
    for i in 0..big_count {
        let mut f = fs::File::create(ctx.join(format!("big/blob{i}.bin"))).expect("create");
        let mut left = big_len;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            rng.fill(&mut block[..n]);
            std::io::Write::write_all(&mut f, &block[..n]).expect("write");
            left -= n as u64;
        }
    }
    (
        small_count + big_count as usize,
        small_bytes + big_len * big_count,
    )
}
