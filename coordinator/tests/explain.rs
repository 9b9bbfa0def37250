//! `explain`: stages re-keyed on the contents hits report, misses explained from the
//! recorded history, stages waiting on a missed stage they copy from named, and the farm's
//! lookup (a record that lacks what this build needs is not a hit, and says so).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use coordinator::cache::{Built, Export, StageCache};
use coordinator::explain::{
    explain, remember, CacheLookup, Explanation, Lookup, StageLookup, NO_HISTORY,
};
use coordinator::store::SledStore;
use model::context::ContextManifest;
use model::frontend::parser::parse;
use model::frontend::plan::{plan, Plan, PlanOptions, Platform};
use model::keys::{compute_keys, StageKey, Unresolved};

fn planned(dockerfile: &str) -> Plan {
    plan(
        &parse(dockerfile.as_bytes()).unwrap(),
        &PlanOptions {
            target: None,
            build_args: BTreeMap::new(),
            platform: Platform::host(),
        },
    )
    .unwrap()
}

/// Hits the stages of `hits` with these contents; misses the rest.
struct Fake {
    hits: BTreeMap<usize, BTreeMap<String, String>>,
}

#[async_trait::async_trait]
impl StageLookup for Fake {
    async fn lookup(&self, stage: usize, _: &StageKey, _: &[String]) -> Lookup {
        match self.hits.get(&stage) {
            Some(c) => Lookup::Hit(c.clone()),
            None => Lookup::Miss,
        }
    }
}

#[tokio::test]
async fn hits_rekey_consumers_and_misses_are_explained() {
    let p = planned("FROM scratch AS a\nENV X=1\n\nFROM scratch AS b\nCOPY --from=a /out /out\n");
    let manifest = ContextManifest::default();
    let keys = compute_keys(&p, &manifest, &Unresolved);
    let dir = tempfile::tempdir().unwrap();
    let history = SledStore::open(&dir.path().join("index")).unwrap();
    let contents: BTreeMap<String, String> = [("/out".to_string(), "d1".to_string())].into();
    let a_hits = Fake {
        hits: [(0, contents)].into(),
    };

    let e = explain(&p, &manifest, &Unresolved, &keys, &history, "df", &a_hits).await;
    assert_eq!(e.stages.len(), 2);
    assert!(e.stages[0].hit && e.stages[0].reasons.is_empty());
    let b = &e.stages[1];
    assert!(!b.hit);
    // Keyed on the content read from the hit, as the scheduler keys it.
    assert_ne!(b.key, keys[1].key.to_hex());
    assert_eq!(b.reasons, vec![NO_HISTORY.to_string()]);
    assert!(b.copies_from_missed.is_empty());

    // Recorded on the static keys: the same build explains with no differences, and a
    // consumer of a missed stage says it may still be served.
    remember(&history, "df", &p, &keys, [0, 1].into_iter());
    let none = Fake {
        hits: BTreeMap::new(),
    };
    let e = explain(&p, &manifest, &Unresolved, &keys, &history, "df", &none).await;
    assert_eq!(e.stages[1].key, keys[1].key.to_hex());
    assert!(e.stages[1].reasons.is_empty());
    assert_eq!(e.stages[1].copies_from_missed, vec!["a".to_string()]);
    let short = |k: &str| k[..12].to_string();
    assert_eq!(
        e.lines(),
        vec![
            format!("#0 a: miss ({})", short(&e.stages[0].key)),
            format!(
                "#1 b: miss ({}), unless stage a rebuilds the files copied from it unchanged",
                short(&e.stages[1].key)
            ),
        ]
    );

    // Another Dockerfile has no history here.
    let e = explain(&p, &manifest, &Unresolved, &keys, &history, "other", &none).await;
    assert_eq!(e.stages[0].reasons, vec![NO_HISTORY.to_string()]);

    // Explanation/1 round-trips.
    let json = serde_json::to_vec(&e).unwrap();
    assert_eq!(serde_json::from_slice::<Explanation>(&json).unwrap(), e);
}

#[tokio::test]
async fn farm_lookup_needs_what_this_build_consumes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(StageCache::open(dir.path(), true).unwrap());
    let key = StageKey([7; 32]);
    let contents: BTreeMap<String, String> = [("/out".to_string(), "d1".to_string())].into();
    cache
        .stage_built(&Built {
            key: &key,
            name: "a",
            image_id: "sha256:abc",
            image_size: 0,
            duration: Duration::from_millis(5),
            worker: "w1",
            tags: &[],
            contents: &contents,
        })
        .unwrap();
    let lookup = |need: Export| CacheLookup {
        cache: &cache,
        exports: [(0, need)].into(),
    };
    assert_eq!(
        lookup(Export::default()).lookup(0, &key, &[]).await,
        Lookup::Hit(contents.clone())
    );
    match lookup(Export {
        image: true,
        paths: ["/out".to_string()].into(),
    })
    .lookup(0, &key, &[])
    .await
    {
        Lookup::Unusable(why) => assert!(why.ends_with("the image, /out"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        lookup(Export::default())
            .lookup(0, &StageKey([8; 32]), &[])
            .await,
        Lookup::Miss
    );
    // Looking up counts nothing.
    assert_eq!(cache.stats().unwrap().hits, 0);
}
