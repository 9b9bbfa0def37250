//! A small tar reader and writer over std: enough for `docker save` output (ustar, PAX and
//! GNU long names, base-256 numbers) and for the base-image rootfs the tests import.

use std::collections::BTreeMap;

/// One member of a tar stream.
#[derive(Debug, Clone)]
pub struct Member {
    /// As stored (`./etc/passwd`, `etc/`, ...); see [`normalize`].
    pub name: String,
    /// The raw typeflag byte (`b'0'` file, `b'5'` dir, `b'2'` symlink, `b'1'` hardlink ...).
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub link: String,
    pub dev_major: u64,
    pub dev_minor: u64,
    /// `SCHILY.xattr.*` PAX records, name → value.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub data: Vec<u8>,
}

/// `./a/b/`, `/a/b`, `a/b` → `/a/b`; the root itself is `/`.
pub fn normalize(name: &str) -> String {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn field_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn field_num(b: &[u8]) -> Result<u64, String> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // base-256: big-endian, the first byte's top bit is the marker.
        let mut v: u64 = u64::from(b[0] & 0x7f);
        for &c in &b[1..] {
            v = (v << 8) | u64::from(c);
        }
        return Ok(v);
    }
    let s = field_str(b);
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|e| format!("bad octal field {s:?}: {e}"))
}

fn pax_records(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&c| c == b' ')
            .ok_or("PAX record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("PAX record with a bad length")?;
        if len > rest.len() || len < sp + 2 {
            return Err("PAX record overruns its header".into());
        }
        let record = &rest[sp + 1..len - 1]; // without the trailing newline
        let eq = record
            .iter()
            .position(|&c| c == b'=')
            .ok_or("PAX record without '='")?;
        out.push((
            String::from_utf8_lossy(&record[..eq]).into_owned(),
            record[eq + 1..].to_vec(),
        ));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Every member of an uncompressed tar stream, in order; PAX and GNU long-name headers are
/// folded into the member they describe.
pub fn read(bytes: &[u8]) -> Result<Vec<Member>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut global: Vec<(String, Vec<u8>)> = Vec::new();
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    while pos + 512 <= bytes.len() {
        let h = &bytes[pos..pos + 512];
        if h.iter().all(|&c| c == 0) {
            break;
        }
        let stored: u64 = field_num(&h[148..156])?;
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(c)
                }
            })
            .sum();
        if stored != sum {
            return Err(format!("tar header at byte {pos}: bad checksum"));
        }
        let size = field_num(&h[124..136])? as usize;
        let kind = h[156];
        let data_start = pos + 512;
        let data_end = data_start + size;
        if data_end > bytes.len() {
            return Err(format!("tar member at byte {pos} is truncated"));
        }
        let data = &bytes[data_start..data_end];
        pos = data_start + size.div_ceil(512) * 512;
        match kind {
            b'x' => {
                pax.extend(pax_records(data)?);
                continue;
            }
            b'g' => {
                global.extend(pax_records(data)?);
                continue;
            }
            b'L' => {
                long_name = Some(field_str(data));
                continue;
            }
            b'K' => {
                long_link = Some(field_str(data));
                continue;
            }
            _ => {}
        }
        let mut name = field_str(&h[0..100]);
        if &h[257..262] == b"ustar" {
            let prefix = field_str(&h[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let mut m = Member {
            name: long_name.take().unwrap_or(name),
            kind: if kind == 0 { b'0' } else { kind },
            mode: field_num(&h[100..108])? as u32,
            uid: field_num(&h[108..116])?,
            gid: field_num(&h[116..124])?,
            link: long_link.take().unwrap_or_else(|| field_str(&h[157..257])),
            dev_major: field_num(&h[329..337])?,
            dev_minor: field_num(&h[337..345])?,
            xattrs: BTreeMap::new(),
            data: data.to_vec(),
        };
        let local = std::mem::take(&mut pax);
        for (k, v) in global.iter().chain(local.iter()) {
            let text = || String::from_utf8_lossy(v).into_owned();
            match k.as_str() {
                "path" => m.name = text(),
                "linkpath" => m.link = text(),
                "uid" => m.uid = text().parse().map_err(|_| "bad PAX uid")?,
                "gid" => m.gid = text().parse().map_err(|_| "bad PAX gid")?,
                _ => {
                    if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                        m.xattrs.insert(x.to_string(), v.clone());
                    }
                }
            }
        }
        out.push(m);
    }
    Ok(out)
}

/// Writes a ustar stream (names up to 100 bytes, which is all the tests need).
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

/// The mtime every member gets: content, not time, is what the tests compare.
const MTIME: u64 = 1_577_836_800; // 2020-01-01

impl Writer {
    fn header(
        &mut self,
        name: &str,
        kind: u8,
        mode: u32,
        owner: (u64, u64),
        link: &str,
        size: usize,
    ) {
        assert!(
            name.len() <= 100 && link.len() <= 100,
            "name too long for ustar: {name}"
        );
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let mut num = |range: std::ops::Range<usize>, v: u64| {
            let width = range.len() - 1;
            let s = format!("{v:0width$o}");
            h[range.start..range.start + width].copy_from_slice(s.as_bytes());
        };
        num(100..108, u64::from(mode));
        num(108..116, owner.0);
        num(116..124, owner.1);
        num(124..136, size as u64);
        num(136..148, MTIME);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&c| u32::from(c)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        self.buf.extend_from_slice(&h);
    }

    pub fn dir(&mut self, name: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        let n = format!("{}/", name.trim_end_matches('/'));
        self.header(&n, b'5', mode, owner, "", 0);
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> &mut Self {
        self.header(name, b'0', mode, owner, "", data.len());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().div_ceil(512) * 512, 0);
        self
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(name, b'2', 0o777, (0, 0), target, 0);
        self
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(name, b'1', 0o644, (0, 0), target, 0);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
        self.buf
    }
}
