//! `ContentService`: which blobs are missing, chunked upload (verified before it is kept)
//! and chunked download (verified as it is read; a corrupt blob is deleted, never served).
use std::pin::Pin;

use futures::Stream;
use proto::v1::content_service_server::ContentService;
use proto::v1::{
    BlobChunk, DownloadBlobRequest, MissingBlobsRequest, MissingBlobsResponse, UploadBlobResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use model::blobs::{BlobError, BlobStore};
use wire::blob::{parse_digest, pb_digest, ChunkSink, CHUNK};

pub struct ContentServer {
    blobs: BlobStore,
}

impl ContentServer {
    pub fn new(blobs: BlobStore) -> Self {
        ContentServer { blobs }
    }
}

pub fn store_status(e: BlobError) -> Status {
    match e {
        BlobError::Missing(_) => Status::not_found(e.to_string()),
        BlobError::Corrupt { .. } => Status::data_loss(e.to_string()),
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
        let writer = tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
            let mut w = blobs.writer(Some(expected))?;
            while let Some(chunk) = rx.blocking_recv() {
                std::io::Write::write_all(&mut w, &chunk).map_err(|source| BlobError::BlobIo {
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
                sink.flush_chunk().map_err(|source| BlobError::BlobIo {
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
