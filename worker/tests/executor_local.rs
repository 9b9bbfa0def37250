//! The shortcuts of a worker beside its daemon. A RUN's layer read from the container's
//! overlay upper directory: what it writes, and that an image built that way is the image
//! the daemon's change list gives, and BuildKit's. A `--network=none` RUN without the
//! daemon's network sandbox: what it sees is what it saw with the sandbox.

use testkit::executor::*;
use worker::executor::upper;

/// The daemon's storage driver.
fn storage_driver() -> String {
    docker(&["info", "--format", "{{.Driver}}"])
        .unwrap()
        .trim()
        .to_string()
}

/// Whether this test process can read the daemon's overlay directories (a worker beside
/// its daemon, as root): then the fast path must be taken, never silently skipped.
fn upper_expected() -> bool {
    let overlay = ["overlay2", "fuse-overlayfs"].contains(&storage_driver().as_str());
    overlay && unsafe { libc::geteuid() } == 0
}

/// (path, type, mode, uid:gid, link) of every entry of a layer tar, in order.
fn entries(layer: &[u8]) -> Vec<(String, String, u32, String, String)> {
    let mut ar = tar::Archive::new(layer);
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                e.path().unwrap().to_string_lossy().to_string(),
                format!("{:?}", h.entry_type()),
                h.mode().unwrap(),
                format!("{}:{}", h.uid().unwrap(), h.gid().unwrap()),
                e.link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_upper_dir_layer_holds_exactly_what_the_run_changed() {
    let ex = executor("tupperlayer").await;
    if !upper_expected() {
        eprintln!(
            "storage driver {} or not root: the upper directory is not read here",
            storage_driver()
        );
        return;
    }
    // A base with a directory the RUN replaces, so its opaque mark has something to hide.
    let base = docker(&[
        "run",
        "-d",
        "--network",
        "none",
        BUSYBOX,
        "sh",
        "-c",
        "mkdir -p /old/sub && echo o > /old/sub/x && echo k > /old/keep",
    ])
    .unwrap()
    .trim()
    .to_string();
    docker(&["wait", &base]).unwrap();
    let image = docker(&["commit", &base]).unwrap().trim().to_string();
    docker(&["rm", &base]).unwrap();
    let script = "rm /bin/vi && rm -rf /old && mkdir /old && echo new > /old/n \
        && mkdir -p /added/a/b && echo 1 > /added/a/one && chmod 700 /added/a/b \
        && chown 7:8 /added/a/one && ln /added/a/one /added/hl && ln -s a/one /added/sl \
        && mkfifo /added/fifo && echo big > /big && chown 3000000:3000001 /big \
        && chmod 0700 /tmp && echo more >> /etc/passwd";
    let c = docker(&["run", "-d", "--network", "none", &image, "sh", "-c", script])
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(docker(&["wait", &c]).unwrap().trim(), "0");
    let dirs = upper::container_dirs(ex.daemon(), &c)
        .await
        .expect("the upper directory of a container on this daemon");
    let layer = upper::layer_from_upper(&dirs, 1 << 20)
        .expect("read the upper directory")
        .expect("under the byte limit")
        .expect("the RUN changed something");
    let too_small = upper::layer_from_upper(&dirs, 4).unwrap();
    docker(&["rm", &c]).unwrap();
    docker(&["rmi", &image]).unwrap();
    assert!(
        too_small.is_none(),
        "a layer past the byte limit is refused"
    );

    let got = entries(&layer.tar);
    let names: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|(p, t, _, _, l)| (p.as_str(), t.as_str(), l.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("added/", "Directory", ""),
            ("added/a/", "Directory", ""),
            ("added/a/b/", "Directory", ""),
            ("added/a/one", "Regular", ""),
            ("added/fifo", "Fifo", ""),
            ("added/hl", "Link", "added/a/one"),
            ("added/sl", "Symlink", "a/one"),
            ("big", "Regular", ""),
            ("bin/", "Directory", ""),
            ("bin/.wh.vi", "Regular", ""),
            ("etc/", "Directory", ""),
            ("etc/passwd", "Regular", ""),
            ("old/", "Directory", ""),
            ("old/.wh..wh..opq", "Regular", ""),
            ("old/n", "Regular", ""),
            ("tmp/", "Directory", ""),
        ],
        "{got:#?}"
    );
    let by_path = |p: &str| got.iter().find(|e| e.0 == p).unwrap();
    assert_eq!(by_path("added/a/b/").2, 0o700);
    assert_eq!(by_path("added/a/one").3, "7:8");
    assert_eq!(by_path("big").3, "3000000:3000001");
    assert_eq!(by_path("tmp/").2, 0o700);
    // Added paths are held whole; a replaced directory is not added.
    assert_eq!(layer.whole, ["/added", "/big"]);
}

/// The same Dockerfile built reading upper directories, built from the daemon's change
/// list, and built by BuildKit: one filesystem.
#[tokio::test]
async fn images_from_the_upper_dir_equal_change_list_and_buildkit_images() {
    let fast = executor("tupperfast").await;
    let slow = executor("tupperslow").await.without_local_shortcuts();
    let dir = tempfile::tempdir().unwrap();
    // Each executor gets its own keys (a label first), or the second would reuse the
    // first one's images; the process id keeps earlier runs' images out too.
    let pid = std::process::id();
    let df = |variant: &str| {
        format!(
            "FROM {BUSYBOX}\nLABEL variant={variant}-{pid}\n\
         RUN mkdir -p /old/sub && echo o > /old/sub/x && echo k > /old/keep && mkdir /kept\n\
         RUN rm /bin/vi && rm -rf /old && mkdir /old && echo new > /old/n \
           && mkdir -p /added/a/b && echo 1 > /added/a/one && chmod 700 /added/a/b \
           && chown 7:8 /added/a/one && ln /added/a/one /added/hl && ln -s a/one /added/sl \
           && echo big > /big && chown 3000000:3000001 /big && chmod 0700 /tmp \
           && echo more >> /etc/passwd && rmdir /kept && touch /kept\n\
         RUN rm -rf /added/a && echo again > /big\n"
        )
    };
    let ours = build_ours(&fast, dir.path(), &df("fast")).await;
    let reference = build_ours(&slow, dir.path(), &df("slow")).await;
    let fs_fast = image_fs(&ours);
    let fs_slow = image_fs(&reference);
    let d = diff(&fs_fast, &fs_slow);
    assert!(d.is_empty(), "upper dir vs change list:\n{}", d.join("\n"));
    let tag = format!("dbuild-worker-test/upper-bk-{pid}");
    build_buildkit(dir.path(), &df("fast"), &tag);
    assert_same(&ours, &tag);
    docker(&["rmi", &tag]).unwrap();
    assert!(leftovers(&fast).await.is_empty());
    assert!(leftovers(&slow).await.is_empty());
}

/// A `--network=none` RUN sees only its loopback, resolves `localhost`, reads the same
/// `/etc/hosts` and `/etc/resolv.conf` with and without the daemon's sandbox (as a user
/// other than root too), and what it writes to them stays out of the image.
#[tokio::test]
async fn a_network_none_run_sees_what_the_daemons_sandbox_gave() {
    let scratch = tempfile::tempdir().unwrap();
    let fast = executor("tnetfast").await.with_scratch_dir(scratch.path());
    let slow = executor("tnetslow").await.without_local_shortcuts();
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let df = |variant: &str| {
        format!(
            "FROM {BUSYBOX}\nLABEL variant={variant}-{pid}\n\
             RUN --network=none mkdir /seen && grep -c : /proc/net/dev > /seen/interfaces \
               && ping -c1 -W2 localhost > /dev/null && echo resolved > /seen/localhost \
               && cat /etc/hosts > /seen/hosts && cat /etc/resolv.conf > /seen/resolv \
               && echo '10.0.0.1 added' >> /etc/hosts && sleep 2\n\
             USER app\n\
             RUN --network=none cat /etc/hosts /etc/resolv.conf > /tmp/as-app\n"
        )
    };
    // While the RUN sleeps: its container has no network sandbox.
    let watch = std::thread::spawn(|| {
        for _ in 0..100 {
            let ids = docker(&["ps", "-q", "--filter", "name=dbuild-w-tnetfast"]).unwrap();
            if let Some(id) = ids.split_whitespace().next() {
                let f = "{{.Config.NetworkDisabled}} {{.HostConfig.NetworkMode}}";
                return docker(&["inspect", "--format", f, id]).unwrap_or_default();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        String::new()
    });
    let ours = build_ours(&fast, dir.path(), &df("fast")).await;
    assert_eq!(watch.join().unwrap().trim(), "true none");
    let reference = build_ours(&slow, dir.path(), &df("slow")).await;
    let (fs_fast, fs_slow) = (image_fs(&ours), image_fs(&reference));
    let d = diff(&fs_fast, &fs_slow);
    assert!(
        d.is_empty(),
        "without vs with the sandbox:\n{}",
        d.join("\n")
    );
    let read = |image: &str, path: &str| {
        docker(&["run", "--rm", "--network", "none", image, "cat", path]).unwrap()
    };
    assert_eq!(read(&ours, "/seen/interfaces").trim(), "1", "lo only");
    assert!(read(&ours, "/seen/hosts").contains("127.0.0.1\tlocalhost"));
    assert!(!fs_fast.contains_key("etc/hosts") || !read(&ours, "/etc/hosts").contains("added"));
    assert!(fs_fast.contains_key("tmp/as-app"));
    assert!(leftovers(&fast).await.is_empty());
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "network files left: {left:?}");
}

/// Without the upper-directory reader a RUN's layer is read through the archive API,
/// which mounts the container's bind mounts again: the network files of a RUN without
/// the daemon's sandbox must outlive the RUN until its layer is read.
#[tokio::test]
async fn a_network_none_run_read_through_the_archive_api() {
    let scratch = tempfile::tempdir().unwrap();
    let ex = executor("tnetarchive")
        .await
        .with_scratch_dir(scratch.path())
        .without_upper_dirs();
    let dir = tempfile::tempdir().unwrap();
    let df = format!(
        "FROM {BUSYBOX}\nLABEL run={}\n\
         RUN --network=none mkdir -p /made && echo one > /made/f && cat /etc/hosts > /hosts\n",
        std::process::id()
    );
    let img = build_ours(&ex, dir.path(), &df).await;
    let fs = image_fs(&img);
    assert!(
        fs.contains_key("made/f") && fs.contains_key("hosts"),
        "{fs:?}"
    );
    assert!(leftovers(&ex).await.is_empty());
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "network files left: {left:?}");
}
