//! The worker's image cap on a real daemon: the least recently used images go first, until
//! what they add fits the cap. Scoped to this test's own tag prefix, so the daemon's real
//! dbuild images (other tests') are never touched.
use std::time::Duration;

use worker::image_cap::ImageCap;

/// A one-layer image of `kib` KiB of random bytes, tagged `tag`.
fn image(tag: &str, kib: usize) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let bytes: Vec<u8> = (0..kib * 1024)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(7) as u8)
        .collect();
    std::fs::write(root.join(tag.replace([':', '/'], "_")), bytes).unwrap();
    let tar = dir.path().join("layer.tar");
    let ok = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    testkit::executor::docker(&["import", tar.to_str().unwrap(), tag]).unwrap();
}

fn exists(tag: &str) -> bool {
    testkit::executor::docker(&["image", "inspect", tag]).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn least_recently_used_images_go_first_until_they_fit() {
    let prefix = format!("dbuild-captest-{}", std::process::id());
    let tags: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("{prefix}:{n}"))
        .collect();
    for t in &tags {
        image(t, 1024);
    }
    let docker = worker::daemon::Daemon::connect(None).await.unwrap();
    let scoped = format!("{prefix}:");
    let cap = ImageCap::new(docker.clone(), 2_500_000).scoped(&[&scoped], Duration::ZERO);
    // Used in the order a, b, c: a is the least recently used.
    for t in &tags {
        cap.touch([t.clone()]);
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = cap.enforce().await.unwrap();
    assert!((3_000_000..3_400_000).contains(&r.bytes_before), "{r:?}");
    assert_eq!(r.images_removed, 1, "{r:?}");
    assert!(!exists(&tags[0]));
    assert!(exists(&tags[1]) && exists(&tags[2]));

    // c used, then b: under a tighter cap c is the least recently used.
    let tight = ImageCap::new(docker, 1_500_000).scoped(&[&scoped], Duration::ZERO);
    tight.touch([tags[2].clone()]);
    std::thread::sleep(Duration::from_millis(5));
    tight.touch([tags[1].clone()]);
    let r = tight.enforce().await.unwrap();
    assert_eq!(r.images_removed, 1, "{r:?}");
    assert!(!exists(&tags[2]), "c was the least recently used");
    assert!(exists(&tags[1]));

    // Recently used images are never evicted, whatever the cap.
    let guarded = ImageCap::new(worker::daemon::Daemon::connect(None).await.unwrap(), 0)
        .scoped(&[&scoped], Duration::from_secs(600));
    guarded.touch([tags[1].clone()]);
    let r = guarded.enforce().await.unwrap();
    assert_eq!(r.images_removed, 0);
    assert!(exists(&tags[1]));

    // A running task's images stay, however long it runs; once it ends they can go.
    let none_recent = ImageCap::new(worker::daemon::Daemon::connect(None).await.unwrap(), 0)
        .scoped(&[&scoped], Duration::ZERO);
    none_recent.begin("task-1", vec![tags[1].clone()]);
    assert_eq!(none_recent.enforce().await.unwrap().images_removed, 0);
    assert!(exists(&tags[1]));
    none_recent.end("task-1");
    assert_eq!(none_recent.enforce().await.unwrap().images_removed, 1);
    assert!(!exists(&tags[1]));
}

/// Parked stage images count against the cap by their archives' sizes and go least
/// recently used first, never one a running task reads.
#[tokio::test(flavor = "multi_thread")]
async fn parked_images_count_and_go_least_recently_used_first() {
    use worker::executor::park::{Parked, ParkedName};
    let dir = tempfile::tempdir().unwrap();
    let parked = Parked::open(dir.path()).unwrap();
    let name = |n: &str| ParkedName {
        name: String::new(),
        archive: String::new(),
        id: format!("sha256:{n}"),
        base: None,
        layers: Vec::new(),
    };
    for (n, fill) in [("old", 1u8), ("busy", 2), ("mid", 3), ("new", 4)] {
        parked
            .put(&vec![fill; 1000], &[(format!("t:{n}"), name(n))])
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let docker = worker::daemon::Daemon::connect(None).await.unwrap();
    // No daemon image in scope: only the parked ones weigh.
    let scope = format!("dbuild-parkcaptest-{}:", std::process::id());
    let cap = ImageCap::new(docker, 2500)
        .scoped(&[&scope], Duration::ZERO)
        .with_parked(Some(parked.clone()));
    cap.begin("task", vec!["t:busy".into()]);
    let r = cap.enforce().await.unwrap();
    assert_eq!(r.bytes_before, 4000, "{r:?}");
    assert_eq!((r.images_removed, r.bytes_freed), (2, 2000), "{r:?}");
    assert!(parked.peek("t:old").is_none() && parked.peek("t:mid").is_none());
    assert!(
        parked.peek("t:busy").is_some(),
        "a running task's input stays"
    );
    assert!(
        parked.peek("t:new").is_some(),
        "the most recently used stays"
    );
}
