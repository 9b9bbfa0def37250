//! ContentService over real gRPC on loopback, with the store on disk.
use coordinator::service::ContentServer;
use coordinator::store::BlobStore;
use model::digest::BlobDigest;
use proto::v1::content_service_client::ContentServiceClient;
use proto::v1::content_service_server::ContentServiceServer;
use proto::v1::{DownloadBlobRequest, MissingBlobsRequest};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use wire::blob::{pb_digest, receive_blob, upload_chunks};

async fn serve(blobs: BlobStore) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ContentServiceServer::new(ContentServer::new(blobs)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

#[tokio::test]
async fn upload_only_what_is_missing_then_download_verified() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let url = serve(blobs.clone()).await;
    let mut client = ContentServiceClient::connect(url).await.unwrap();

    // 3.5 MiB: several chunks.
    let big: Vec<u8> = (0..(3 * 1024 * 1024 + 512 * 1024))
        .map(|i| (i % 251) as u8)
        .collect();
    let small = b"small".to_vec();
    let (db, ds) = (BlobDigest::of(&big), BlobDigest::of(&small));
    blobs.put(&small).unwrap();
    let missing = client
        .missing_blobs(MissingBlobsRequest {
            digests: vec![pb_digest(&db), pb_digest(&ds)],
        })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![pb_digest(&db)]);

    let up = client
        .upload_blob(ReceiverStream::new(upload_chunks(
            db,
            big.len() as u64,
            std::io::Cursor::new(big.clone()),
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(up.stored);
    assert_eq!(up.size, big.len() as u64);
    assert_eq!(blobs.read(&db).unwrap(), big);

    let stream = client
        .download_blob(DownloadBlobRequest {
            digest: Some(pb_digest(&db)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let (d, n) = receive_blob(stream, &mut got).await.unwrap();
    assert_eq!((d, n), (db, big.len() as u64));
    assert_eq!(got, big);
}

#[tokio::test]
async fn a_lying_upload_is_refused_and_a_corrupt_blob_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let url = serve(blobs.clone()).await;
    let mut client = ContentServiceClient::connect(url).await.unwrap();

    let claimed = BlobDigest::of(b"what I claim");
    let err = client
        .upload_blob(ReceiverStream::new(upload_chunks(
            claimed,
            3,
            std::io::Cursor::new(b"not it".to_vec()),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    assert!(!blobs.contains(&claimed));

    let d = blobs.put(b"original").unwrap();
    let hex = d.to_hex();
    std::fs::write(dir.path().join(&hex[..2]).join(&hex), b"tampered").unwrap();
    let stream = client
        .download_blob(DownloadBlobRequest {
            digest: Some(pb_digest(&d)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let err = receive_blob(stream, &mut got).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    assert!(!blobs.contains(&d), "the corrupt blob is deleted");
}
