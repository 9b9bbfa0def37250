//! Volumes: the temporary ones a RUN's mounts fill (removed with the stage's
//! [`Resources`]) and the named cache-mount volumes (kept on purpose).
use bollard::models::VolumeCreateRequest;
use model::task::StageError;

use super::{derr, is_not_found, timed, Daemon, Resources};

impl Daemon {
    /// Creates a volume named by this executor (removed with the stage's resources);
    /// returns its name and its mount point on the daemon's host.
    pub async fn temp_volume(&self, res: &Resources) -> Result<(String, String), StageError> {
        let name = self.unique("v");
        let v = timed(
            "create_volume",
            self.docker.create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| derr("create volume", e))?;
        res.volume(&name);
        Ok((name, v.mountpoint))
    }

    /// Makes the named volume unless it exists; returns its mount point on the daemon's
    /// host.
    pub async fn ensure_volume(&self, name: &str) -> Result<String, StageError> {
        match timed("inspect_volume", self.docker.inspect_volume(name)).await {
            Ok(v) => Ok(v.mountpoint),
            Err(e) if is_not_found(&e) => timed(
                "create_volume",
                self.docker.create_volume(VolumeCreateRequest {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
            )
            .await
            .map(|v| v.mountpoint)
            .map_err(|e| derr(format!("create cache volume {name}"), e)),
            Err(e) => Err(derr(format!("inspect volume {name}"), e)),
        }
    }
}
