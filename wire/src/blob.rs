//! Chunked blob transfer: blobs travel in messages of at most [`CHUNK`] bytes, the first
//! naming the digest and size; a receiver hashes what arrives and discards a blob whose
//! bytes do not match its name.
use std::io::{Read, Write};
use std::path::Path;

use model::blobs::{BlobError, BlobStore, BlobWriter};
use model::digest::BlobDigest;
use model::task::Artifact;
use proto::v1::{
    ArtifactBlob, BlobChunk, BlobDigest as PbDigest, DownloadBlobRequest, MissingBlobsRequest,
};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::client::Content;

/// Largest chunk of a streamed blob (the default gRPC message limit is 4 MiB).
pub const CHUNK: usize = 1 << 20;

/// A client-side transfer that failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("coordinator refused: {0}")]
    Rpc(#[from] Status),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub fn parse_digest(d: Option<&PbDigest>) -> Result<BlobDigest, Status> {
    let hex = d.map(|d| d.hex.as_str()).unwrap_or("");
    BlobDigest::from_hex(hex)
        .ok_or_else(|| Status::invalid_argument(format!("not a blake3 digest: {hex:?}")))
}

pub fn pb_digest(d: &BlobDigest) -> PbDigest {
    PbDigest { hex: d.to_hex() }
}

/// Turns written bytes into download chunks, the first naming the digest and size
/// (the server side of a download; run on a blocking thread).
pub struct ChunkSink<'a> {
    pub tx: &'a mpsc::Sender<Result<BlobChunk, Status>>,
    pub first: Option<(BlobDigest, u64)>,
    pub buf: Vec<u8>,
}

impl ChunkSink<'_> {
    pub fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() && self.first.is_none() {
            return Ok(());
        }
        let (digest, size) = match self.first.take() {
            Some((d, s)) => (Some(pb_digest(&d)), Some(s)),
            None => (None, None),
        };
        let chunk = BlobChunk {
            digest,
            size,
            data: std::mem::take(&mut self.buf),
        };
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone"))
    }
}

impl std::io::Write for ChunkSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads a whole downloaded stream into `out`, checking the digest announced by the first
/// chunk (the client side of [`ContentServer::download_blob`]).
pub async fn receive_blob(
    mut stream: Streaming<BlobChunk>,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(BlobDigest, u64), Status> {
    let mut hasher = blake3::Hasher::new();
    let mut expected = None;
    let mut total = 0u64;
    while let Some(chunk) = stream.message().await? {
        if expected.is_none() {
            expected = Some(parse_digest(chunk.digest.as_ref())?);
        }
        hasher.update(&chunk.data);
        out.write_all(&chunk.data)
            .map_err(|e| Status::internal(e.to_string()))?;
        total += chunk.data.len() as u64;
    }
    let expected = expected.ok_or_else(|| Status::data_loss("empty blob stream"))?;
    let actual = BlobDigest::from(hasher.finalize());
    if actual != expected {
        return Err(Status::data_loss(format!(
            "blob {expected} arrived as {actual}: discarded"
        )));
    }
    Ok((expected, total))
}

/// Splits a reader into upload chunks, the first naming the digest and size.
pub fn upload_chunks(
    digest: BlobDigest,
    size: u64,
    mut reader: impl Read + Send + 'static,
) -> mpsc::Receiver<BlobChunk> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut first = true;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(_) => return,
                }
            }
            if filled == 0 && !first {
                return;
            }
            let chunk = BlobChunk {
                digest: first.then(|| pb_digest(&digest)),
                size: first.then_some(size),
                data: buf[..filled].to_vec(),
            };
            first = false;
            if tx.blocking_send(chunk).is_err() || filled < CHUNK {
                return;
            }
        }
    });
    rx
}

pub fn pb_artifact(a: &Artifact) -> ArtifactBlob {
    ArtifactBlob {
        stage_key: a.stage_key.to_hex(),
        path: a.path.clone(),
        digest: BlobDigest::from_hex(&a.digest).map(|d| pb_digest(&d)),
        size: a.size,
    }
}

pub fn artifact(a: &ArtifactBlob) -> Result<Artifact, Status> {
    Ok(Artifact {
        stage_key: model::keys::StageKey::from_hex(&a.stage_key)
            .ok_or_else(|| Status::invalid_argument("bad stage key"))?,
        path: a.path.clone(),
        digest: parse_digest(a.digest.as_ref())?.to_hex(),
        size: a.size,
    })
}

/// Uploads a file as a blob unless the store has it; returns its digest and size.
pub async fn upload_file(
    content: &mut Content,
    path: &Path,
) -> Result<(BlobDigest, u64), TransferError> {
    let p = path.to_path_buf();
    let file_err = |source| TransferError::File {
        path: path.to_path_buf(),
        source,
    };
    let (digest, size) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut h = blake3::Hasher::new();
        let f = std::fs::File::open(&p)?;
        let size = f.metadata()?.len();
        h.update_reader(f)?;
        Ok((BlobDigest::from(h.finalize()), size))
    })
    .await
    .map_err(|e| file_err(std::io::Error::other(e)))?
    .map_err(file_err)?;
    let missing = content
        .missing_blobs(MissingBlobsRequest {
            digests: vec![pb_digest(&digest)],
        })
        .await?
        .into_inner()
        .missing;
    if !missing.is_empty() {
        let f = std::fs::File::open(path).map_err(file_err)?;
        content
            .upload_blob(tokio_stream::wrappers::ReceiverStream::new(upload_chunks(
                digest, size, f,
            )))
            .await?;
    }
    Ok((digest, size))
}

/// Downloads a blob into a local blob store (verified on receipt) unless it is there.
pub async fn download_to(
    content: &mut Content,
    blobs: &BlobStore,
    digest: &BlobDigest,
) -> Result<(), TransferError> {
    if blobs.contains(digest) {
        return Ok(());
    }
    let stream = content
        .download_blob(DownloadBlobRequest {
            digest: Some(pb_digest(digest)),
        })
        .await?
        .into_inner();
    let mut w = blobs.writer(Some(*digest))?;
    struct Sink<'a>(&'a mut BlobWriter);
    impl Write for Sink<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    receive_blob(stream, &mut Sink(&mut w)).await?;
    w.commit()?;
    Ok(())
}
