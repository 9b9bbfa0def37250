//! `ContentService`: which blobs are missing, chunked upload (verified before it is kept)
//! and chunked download (verified as it is read; a corrupt blob is deleted, never served).
use std::io::Read;
use std::pin::Pin;

use futures::Stream;
use proto::v1::content_service_server::ContentService;
use proto::v1::{
    BlobChunk, BlobDigest as PbDigest, DownloadBlobRequest, MissingBlobsRequest,
    MissingBlobsResponse, UploadBlobResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::CHUNK;
use crate::digest::BlobDigest;
use crate::store::{BlobStore, StoreError};

pub struct ContentServer {
    blobs: BlobStore,
}

impl ContentServer {
    pub fn new(blobs: BlobStore) -> Self {
        ContentServer { blobs }
    }
}

pub fn parse_digest(d: Option<&PbDigest>) -> Result<BlobDigest, Status> {
    let hex = d.map(|d| d.hex.as_str()).unwrap_or("");
    BlobDigest::from_hex(hex)
        .ok_or_else(|| Status::invalid_argument(format!("not a blake3 digest: {hex:?}")))
}

pub fn pb_digest(d: &BlobDigest) -> PbDigest {
    PbDigest { hex: d.to_hex() }
}

pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Missing(_) => Status::not_found(e.to_string()),
        StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ContentService for ContentServer {
    async fn missing_blobs(
        &self,
        req: Request<MissingBlobsRequest>,
    ) -> Result<Response<MissingBlobsResponse>, Status> {
        let mut missing = Vec::new();
        for d in &req.get_ref().digests {
            let digest = parse_digest(Some(d))?;
            if self.blobs.contains(&digest) {
                // About to be named by a build: not swept as unreferenced meanwhile.
                self.blobs.touch(&digest);
            } else {
                missing.push(pb_digest(&digest));
            }
        }
        Ok(Response::new(MissingBlobsResponse { missing }))
    }

    async fn upload_blob(
        &self,
        req: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<UploadBlobResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload"))?;
        let expected = parse_digest(first.digest.as_ref())?;
        let blobs = self.blobs.clone();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        // The file is written on a blocking thread while chunks arrive.
        let writer = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let mut w = blobs.writer(Some(expected))?;
            while let Some(chunk) = rx.blocking_recv() {
                std::io::Write::write_all(&mut w, &chunk).map_err(|source| StoreError::BlobIo {
                    digest: expected.to_hex(),
                    source,
                })?;
            }
            w.commit()
        });
        let mut pending = Some(first.data);
        loop {
            if let Some(data) = pending.take() {
                if tx.send(data).await.is_err() {
                    break;
                }
            }
            match stream.message().await? {
                Some(c) => pending = Some(c.data),
                None => break,
            }
        }
        drop(tx);
        let (digest, size, stored) = writer
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        Ok(Response::new(UploadBlobResponse {
            digest: Some(pb_digest(&digest)),
            size,
            stored,
        }))
    }

    type DownloadBlobStream = ChunkStream;

    async fn download_blob(
        &self,
        req: Request<DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let digest = parse_digest(req.get_ref().digest.as_ref())?;
        let size = self
            .blobs
            .size(&digest)
            .ok_or_else(|| Status::not_found(format!("blob {digest} is not in the store")))?;
        let blobs = self.blobs.clone();
        let (tx, rx) = mpsc::channel::<Result<BlobChunk, Status>>(4);
        tokio::task::spawn_blocking(move || {
            // Chunks go out as they are read; the digest is checked at the end, and a
            // mismatch ends the stream with DATA_LOSS so the receiver discards it.
            let mut sink = ChunkSink {
                tx: &tx,
                first: Some((digest, size)),
                buf: Vec::with_capacity(CHUNK),
            };
            let result = blobs.copy_to(&digest, &mut sink).and_then(|_| {
                sink.flush_chunk().map_err(|source| StoreError::BlobIo {
                    digest: digest.to_hex(),
                    source,
                })
            });
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(store_status(e)));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct ChunkSink<'a> {
    tx: &'a mpsc::Sender<Result<BlobChunk, Status>>,
    first: Option<(BlobDigest, u64)>,
    buf: Vec<u8>,
}

impl ChunkSink<'_> {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
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
