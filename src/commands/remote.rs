//! `dbuild submit --coordinator URL`: the same build on a farm. The client uploads only the
//! context blobs the coordinator lacks, streams the events, and brings the final image back.
//! `dbuild explain --coordinator URL` sends the same request (nothing uploaded).
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use coordinator::explain::Explanation;
use coordinator::scheduler::BuildEvent;
use futures::StreamExt;
use model::analysis::Analysis;
use model::context::EntryKind;
use model::digest::BlobDigest;
use proto::v1::{DownloadBlobRequest, MissingBlobsRequest, SubmitRequest};
use tokio_stream::wrappers::ReceiverStream;
use wire::blob::{pb_digest, receive_blob, upload_chunks};
use wire::Clients;
use wire::{document, from_document};

use super::history::dockerfile_id;
use super::spec::BuildSpec;
use super::submit::{failure_message, SubmitArgs};
use crate::output::{self, Output};
use crate::progress;

/// What every request about this build tells the coordinator: the Dockerfile, the context
/// manifest, target, build args, platform, and the Dockerfile's identity in the build
/// history (as the embedded build keys its history). Options of one command are left
/// at their defaults.
pub(crate) fn build_request(
    spec: &BuildSpec,
    analysis: &Analysis,
) -> anyhow::Result<SubmitRequest> {
    let dockerfile = spec.dockerfile();
    Ok(SubmitRequest {
        dockerfile: std::fs::read(&dockerfile)
            .with_context(|| format!("reading {}", dockerfile.display()))?,
        dockerfile_path: dockerfile.display().to_string(),
        manifest: Some(document(&analysis.manifest)),
        target: spec.target.clone(),
        build_args: spec.build_args()?.into_iter().collect(),
        platform: analysis.plan.platform.to_string(),
        history_id: dockerfile_id(&dockerfile),
        ..Default::default()
    })
}

/// Asks the coordinator to explain the build: it plans, pins and keys it as it would
/// build it, and looks each stage up in its cache and history. Nothing is uploaded.
pub async fn explain(
    url: &str,
    token: Option<String>,
    spec: &BuildSpec,
    analysis: &Analysis,
    export_image: bool,
) -> anyhow::Result<Explanation> {
    let mut clients = Clients::connect(url, token).await?;
    let request = SubmitRequest {
        export_image,
        ..build_request(spec, analysis)?
    };
    let doc = clients
        .builds
        .explain(request)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    from_document(Some(&doc)).map_err(|e| anyhow::anyhow!("{}", e.message()))
}

pub async fn submit(
    args: &SubmitArgs,
    url: &str,
    dockerfile: &Path,
    analysis: Analysis,
    secrets: BTreeMap<String, Vec<u8>>,
    out: &Output,
) -> anyhow::Result<super::submit::Summary> {
    let mut clients = Clients::connect(url, args.token.clone()).await?;
    // Upload the context files the built stages use, and only those the store lacks.
    let mut wanted: BTreeMap<BlobDigest, String> = BTreeMap::new();
    for k in analysis
        .keys
        .iter()
        .filter(|k| analysis.plan.built[k.index])
    {
        for p in &k.context_files {
            if let Some(EntryKind::File { digest, .. }) = analysis.manifest.get(p).map(|e| &e.kind)
            {
                wanted.insert(*digest, p.clone());
            }
        }
    }
    let missing = clients
        .content
        .missing_blobs(MissingBlobsRequest {
            digests: wanted.keys().map(pb_digest).collect(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner()
        .missing;
    // One stream per blob, sixteen at a time: a context of many small files is bound by
    // round trips (and the store's fsync per blob), not bandwidth.
    let uploads = missing.iter().map(|m| {
        let mut content = clients.content.clone();
        let context = &args.spec.context;
        let wanted = &wanted;
        async move {
            let d = BlobDigest::from_hex(&m.hex).context("coordinator sent a bad digest")?;
            let path = context.join(&wanted[&d]);
            let f = std::fs::File::open(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let size = f.metadata()?.len();
            content
                .upload_blob(ReceiverStream::new(upload_chunks(d, size, f)))
                .await
                .map_err(|e| anyhow::anyhow!("uploading {}: {}", path.display(), e.message()))?;
            anyhow::Ok(size)
        }
    });
    let mut uploads = futures::stream::iter(uploads).buffer_unordered(16);
    let mut uploaded = 0u64;
    while let Some(size) = uploads.next().await {
        uploaded += size?;
    }
    drop(uploads);
    tracing::info!(files = missing.len(), bytes = uploaded, "context uploaded");

    let request = SubmitRequest {
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        pull: args.pull,
        secrets: secrets.into_iter().collect(),
        export_image: *out != Output::None,
        network: args.network.clone(),
        ..build_request(&args.spec, &analysis)?
    };
    let mut stream = clients
        .builds
        .submit(request)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    // The coordinator's first message says why stages may be rebuilt (when it has a
    // history of this Dockerfile); progress prints it next to each rebuilt stage.
    let mut first = stream
        .message()
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let mut why = std::collections::BTreeMap::new();
    if let Some(msg) = &first {
        let v: serde_json::Value = serde_json::from_slice(&msg.json)?;
        if v["event"] == "build_reasons" {
            why = serde_json::from_value(v["reasons"].clone()).unwrap_or_default();
            first = None;
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let renderer = tokio::spawn(progress::render(
        args.progress,
        Arc::new(analysis.plan),
        why,
        rx,
    ));
    let mut summary = super::submit::Summary::default();
    let mut failed: Option<BuildEvent> = None;
    let mut finished: Option<BuildEvent> = None;
    let mut image_blob: Option<BlobDigest> = None;
    loop {
        let msg = match first.take() {
            Some(m) => m,
            None => match stream
                .message()
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?
            {
                Some(m) => m,
                None => break,
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&msg.json)?;
        if v["event"] == "target_image" {
            image_blob = v["digest"].as_str().and_then(BlobDigest::from_hex);
            continue;
        }
        let e: BuildEvent = serde_json::from_value(v)?;
        match &e {
            BuildEvent::StageFailed { .. } if failed.is_none() => failed = Some(e.clone()),
            BuildEvent::BuildFinished { .. } => finished = Some(e.clone()),
            BuildEvent::StageFinished { .. } => summary.built += 1,
            BuildEvent::StageCached { .. } => summary.cached += 1,
            _ => {}
        }
        let _ = tx.send(e);
    }
    drop(tx);
    let _ = renderer.await;
    match (finished, failed) {
        (
            Some(BuildEvent::BuildFinished {
                ok: true, image_id, ..
            }),
            _,
        ) => deliver(&mut clients, args, out, image_blob, image_id)
            .await
            .map(|()| summary),
        (
            _,
            Some(BuildEvent::StageFailed {
                name,
                stage,
                error,
                line,
                log_tail,
                ..
            }),
        ) => bail!(failure_message(
            &name.unwrap_or_else(|| format!("stage-{stage}")),
            dockerfile,
            line,
            &error,
            &log_tail
        )),
        _ => bail!("the coordinator ended the build without a result"),
    }
}

/// A blob from the coordinator's store (verified on receipt) into `out`.
async fn download(
    clients: &mut Clients,
    digest: &BlobDigest,
    out: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let stream = clients
        .content
        .download_blob(DownloadBlobRequest {
            digest: Some(pb_digest(digest)),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    receive_blob(stream, out)
        .await
        .map_err(|e| anyhow::anyhow!("downloading the image: {}", e.message()))?;
    Ok(())
}

/// A blob into an anonymous temporary file, rewound (images and layers can be large).
async fn download_file(
    clients: &mut Clients,
    digest: &BlobDigest,
) -> anyhow::Result<std::fs::File> {
    use std::io::Seek;
    let mut f = tempfile::tempfile().context("a temporary file for the image")?;
    download(clients, digest, &mut f).await?;
    f.seek(std::io::SeekFrom::Start(0))?;
    Ok(f)
}

async fn deliver(
    clients: &mut Clients,
    args: &SubmitArgs,
    out: &Output,
    blob: Option<BlobDigest>,
    image_id: Option<String>,
) -> anyhow::Result<()> {
    if *out == Output::None {
        return Ok(());
    }
    let blob = blob.context("the coordinator did not export the final image")?;
    let mut first = download_file(clients, &blob).await?;
    // An image stored as parts comes back whole: its index, then every layer, assembled
    // in a temporary file (never in memory).
    let mut head = Vec::new();
    {
        use std::io::Read;
        (&mut first).take(4 << 20).read_to_end(&mut head)?;
    }
    let mut tar = match model::image_parts::ImageParts::parse(&head) {
        None => {
            use std::io::Seek;
            first.seek(std::io::SeekFrom::Start(0))?;
            first
        }
        Some(parts) => {
            let mut layers = Vec::with_capacity(parts.layers.len());
            for l in &parts.layers {
                let d = BlobDigest::from_hex(&l.digest).context("a bad layer digest")?;
                layers.push(download_file(clients, &d).await?);
            }
            let mut layers = layers.into_iter();
            let mut layer = |_: usize| -> std::io::Result<Option<Box<dyn std::io::Read>>> {
                Ok(layers.next().map(|f| Box::new(f) as Box<dyn std::io::Read>))
            };
            let mut tar = tempfile::tempfile().context("a temporary file for the image")?;
            model::image_parts::assemble(&parts, &mut layer, std::io::BufWriter::new(&mut tar))
                .context("assembling the image")?;
            use std::io::Seek;
            tar.seek(std::io::SeekFrom::Start(0))?;
            tar
        }
    };
    match out {
        Output::Tar(dest) => {
            let mut f = std::fs::File::create(dest)
                .with_context(|| format!("writing {}", dest.display()))?;
            std::io::copy(&mut tar, &mut f)
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        Output::Docker => {
            let docker = output::connect(args.docker_host.as_deref()).await?;
            output::load_file(&docker, tar).await?;
            if let Some(id) = &image_id {
                output::deliver(args.docker_host.as_deref(), out, id, &args.tags).await?;
            }
        }
        Output::None => {}
    }
    if let (Some(path), Some(id)) = (&args.iidfile, &image_id) {
        std::fs::write(path, id)
            .with_context(|| format!("writing --iidfile {}", path.display()))?;
    }
    Ok(())
}
