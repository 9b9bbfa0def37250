//! The base images the tests, the corpus and the examples name, made locally (no registry
//! is reachable here), the one way they are made: `examples/base-images.sh` runs this too. Each is a busybox rootfs (`/bin/busybox` and one symlink per applet,
//! `/etc/passwd` and `/etc/group` with `root` and `app` 1000:1000) written as a tar and
//! `docker import`ed, then tagged under the names the Dockerfiles use.
//!
//! Idempotent and cheap when the images exist: each image carries the label
//! [`SPEC_LABEL`] = a hash of its rootfs tar and config changes, and is only imported again
//! when a tag is missing or carries another spec.

use std::process::Command;
use std::sync::OnceLock;

use crate::docker::{command, run_with, BUILD_TIMEOUT};
use crate::{sha256, tarball};

/// The label holding the hash of what an image was made from.
pub const SPEC_LABEL: &str = "org.dbuild.test.base";

/// `alpine:latest` and `busybox:latest`: the plain busybox rootfs.
pub const ALPINE: &str = "alpine:latest";
pub const BUSYBOX: &str = "busybox:latest";
/// `golang:1.7.3`: the rootfs plus a fake `go` at /usr/local/go/bin/go (see [`FAKE_GO`]).
pub const GOLANG: &str = "golang:1.7.3";
/// `nginx:latest`: the rootfs plus /etc/nginx/nginx.conf ([`NGINX_CONF`]).
pub const NGINX: &str = "nginx:latest";
/// The executor tests' base: the plain busybox rootfs with an empty config (no ENV, no
/// CMD), so what a test's Dockerfile sets is all its image has.
pub const BARE_BUSYBOX: &str = "dbuild-worker-test/busybox:latest";
/// An image whose config holds ONBUILD triggers ([`ONBUILD_TRIGGERS`]).
pub const ONBUILD: &str = "dbuild-test/onbuild:latest";

/// Every tag made here.
pub const TAGS: &[&str] = &[ALPINE, BUSYBOX, GOLANG, NGINX, ONBUILD, BARE_BUSYBOX];

pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const GO_PATH: &str =
    "/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
pub const GROUP: &str = "root:x:0:\napp:x:1000:\n";

/// What `docker run --rm` of a binary built by the fake `go` prints.
pub const FAKE_GO_OUTPUT: &str = r#"{"external":0,"internal":0}"#;

/// The stand-in for the Go toolchain: `go build [flags] [-o OUT] [.]` checks that the
/// directory has .go files and writes OUT, a shell script printing [`FAKE_GO_OUTPUT`] whose
/// second line records a checksum of the sources (so editing them changes the "binary").
pub const FAKE_GO: &str = r#"#!/bin/sh
# Stand-in for the Go toolchain (no registry here): `go build [flags] [-o OUT] [.]`.
set -e
case "$1" in
  build) shift ;;
  version) echo "go version go1.7.3 linux/amd64 (dbuild test stand-in)"; exit 0 ;;
  *) echo "go: only 'go build' and 'go version' are faked" >&2; exit 2 ;;
esac
out=
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out=$2; shift 2 ;;
    -o=*) out=${1#-o=}; shift ;;
    -installsuffix|-ldflags|-tags|-gcflags) shift 2 ;;
    *) shift ;;
  esac
done
[ -n "$out" ] || out=$(basename "$PWD")
set -- *.go
[ -e "$1" ] || { echo "go: no Go files in $PWD" >&2; exit 1; }
sum=$(cat *.go | md5sum | cut -d' ' -f1)
printf '#!/bin/sh\n# built by the fake go from sources %s\necho '"'"'{"external":0,"internal":0}'"'"'\n' "$sum" > "$out"
chmod 755 "$out"
"#;

pub const NGINX_CONF: &str = "# nginx.conf of the dbuild test stand-in for nginx:latest\nuser app;\nworker_processes 1;\nevents { worker_connections 64; }\n";

/// The ONBUILD triggers of [`ONBUILD`]; a stage built FROM it needs `trigger.txt` in its
/// context.
pub const ONBUILD_TRIGGERS: &[&str] = &[
    "ONBUILD RUN echo onbuild-trigger-ran > /onbuild-ran.txt",
    "ONBUILD COPY trigger.txt /from-trigger.txt",
    "ONBUILD ENV TRIGGERED=yes",
];

const ROOT: (u64, u64) = (0, 0);

fn rootfs(extra: impl FnOnce(&mut tarball::Writer)) -> Vec<u8> {
    let mut w = tarball::Writer::default();
    for (d, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/local", 0o755),
        ("usr/local/bin", 0o755),
        ("var", 0o755),
    ] {
        w.dir(d, mode, ROOT);
    }
    w.dir("home/app", 0o755, (1000, 1000));
    let busybox = std::fs::read("/bin/busybox")
        .expect("reading /bin/busybox (install busybox-static: apt-get install busybox-static)");
    w.file("bin/busybox", 0o755, ROOT, &busybox);
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("running /bin/busybox --list");
    let mut applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(String::from)
        .collect();
    applets.sort();
    applets.dedup();
    for a in &applets {
        w.symlink(&format!("bin/{a}"), "busybox");
    }
    w.file("etc/passwd", 0o644, ROOT, PASSWD.as_bytes());
    w.file("etc/group", 0o644, ROOT, GROUP.as_bytes());
    extra(&mut w);
    w.finish()
}

struct Spec {
    tags: &'static [&'static str],
    tar: Vec<u8>,
    changes: Vec<String>,
}

fn specs() -> Vec<Spec> {
    let env_path = format!("ENV PATH={PATH}");
    vec![
        Spec {
            tags: &[ALPINE, BUSYBOX],
            tar: rootfs(|_| {}),
            changes: vec![env_path.clone(), r#"CMD ["/bin/sh"]"#.into()],
        },
        Spec {
            tags: &[GOLANG],
            tar: rootfs(|w| {
                w.dir("usr/local/go", 0o755, ROOT)
                    .dir("usr/local/go/bin", 0o755, ROOT)
                    .file("usr/local/go/bin/go", 0o755, ROOT, FAKE_GO.as_bytes())
                    .dir("go", 0o777, ROOT)
                    .dir("go/src", 0o777, ROOT)
                    .dir("go/bin", 0o777, ROOT);
            }),
            changes: vec![
                format!("ENV PATH={GO_PATH}"),
                "ENV GOLANG_VERSION=1.7.3".into(),
                "ENV GOPATH=/go".into(),
                "WORKDIR /go".into(),
            ],
        },
        Spec {
            tags: &[NGINX],
            tar: rootfs(|w| {
                w.dir("etc/nginx", 0o755, ROOT)
                    .file("etc/nginx/nginx.conf", 0o644, ROOT, NGINX_CONF.as_bytes())
                    .dir("usr/share", 0o755, ROOT)
                    .dir("usr/share/nginx", 0o755, ROOT)
                    .dir("usr/share/nginx/html", 0o755, ROOT)
                    .file(
                        "usr/share/nginx/html/index.html",
                        0o644,
                        ROOT,
                        b"<a href=\"/x\">x</a>\n",
                    );
            }),
            changes: vec![
                env_path.clone(),
                "EXPOSE 80".into(),
                r#"CMD ["nginx", "-g", "daemon off;"]"#.into(),
            ],
        },
        Spec {
            tags: &[BARE_BUSYBOX],
            tar: rootfs(|_| {}),
            changes: Vec::new(),
        },
        Spec {
            tags: &[ONBUILD],
            tar: rootfs(|_| {}),
            changes: std::iter::once(env_path)
                .chain(ONBUILD_TRIGGERS.iter().map(|s| s.to_string()))
                .collect(),
        },
    ]
}

fn docker_text(host: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = command(host);
    cmd.args(args);
    let r = run_with(cmd, None, BUILD_TIMEOUT);
    if r.ok() {
        Ok(r.stdout_text().trim().to_string())
    } else {
        Err(r.report())
    }
}

fn ensure(host: Option<&str>, spec: &Spec) -> Result<(), String> {
    let mut h = spec.tar.clone();
    for c in &spec.changes {
        h.extend_from_slice(c.as_bytes());
        h.push(b'\n');
    }
    let version = sha256::hex(&h)[..16].to_string();
    let current = |tag: &str| {
        docker_text(
            host,
            &[
                "image",
                "inspect",
                "--format",
                &format!("{{{{index .Config.Labels \"{SPEC_LABEL}\"}}}}"),
                tag,
            ],
        )
        .ok()
    };
    if spec
        .tags
        .iter()
        .all(|t| current(t).as_deref() == Some(version.as_str()))
    {
        return Ok(());
    }
    let mut cmd = command(host);
    cmd.arg("import");
    for c in &spec.changes {
        cmd.arg("--change").arg(c);
    }
    cmd.arg("--change")
        .arg(format!("LABEL {SPEC_LABEL}={version}"))
        .args(["-", spec.tags[0]]);
    let r = run_with(cmd, Some(&spec.tar), BUILD_TIMEOUT);
    if !r.ok() {
        return Err(r.report());
    }
    let id = r.stdout_text().trim().to_string();
    for t in &spec.tags[1..] {
        docker_text(host, &["tag", &id, t])?;
    }
    Ok(())
}

/// Makes every base image on the daemon `host` (`None`: the local one) that lacks it.
pub fn base_images_on(host: Option<&str>) -> Result<(), String> {
    specs()
        .iter()
        .try_for_each(|s| ensure(host, s))
        .map_err(|e| format!("making the local base images: {e}"))
}

/// Makes every base image (once per test process); panics when Docker cannot.
pub fn base_images() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| base_images_on(None));
    if let Err(e) = result {
        panic!("{e}");
    }
}
