//! Cache keys: what they cover, what they ignore, how they chain and explain themselves.
use model::context::{ContextManifest, EntryKind, ManifestEntry};
use model::digest::BlobDigest;
use model::frontend::parser::parse;
use model::frontend::plan::{plan, PlanOptions, Platform};
use model::keys::{
    compute_keys, match_sources, rekey_stage, BaseResolver, NoContents, StageKeys, Unresolved,
};

fn file(path: &str, mode: u32, content: &str) -> ManifestEntry {
    ManifestEntry {
        path: path.into(),
        mode,
        kind: EntryKind::File {
            size: content.len() as u64,
            digest: BlobDigest::of(content.as_bytes()),
        },
    }
}

fn dir(path: &str) -> ManifestEntry {
    ManifestEntry {
        path: path.into(),
        mode: 0o755,
        kind: EntryKind::Dir,
    }
}

fn ctx(entries: Vec<ManifestEntry>) -> ContextManifest {
    ContextManifest::from_entries(entries)
}

fn base_ctx() -> Vec<ManifestEntry> {
    vec![
        file("app.go", 0o644, "package main"),
        file("README.md", 0o644, "readme"),
        dir("web"),
        file("web/index.html", 0o644, "<html>"),
        dir("web/css"),
        file("web/css/a.css", 0o644, "a{}"),
        file("notes.txt", 0o644, "n"),
    ]
}

fn opts(args: &[(&str, &str)]) -> PlanOptions {
    PlanOptions {
        target: None,
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        platform: Platform {
            os: "linux".into(),
            arch: "amd64".into(),
            variant: None,
        },
    }
}

fn keys_with(
    src: &str,
    m: &ContextManifest,
    o: &PlanOptions,
    r: &dyn BaseResolver,
) -> Vec<StageKeys> {
    let df = parse(src.as_bytes()).unwrap();
    compute_keys(&plan(&df, o).unwrap(), m, r)
}

fn keys(src: &str, m: &ContextManifest) -> Vec<StageKeys> {
    keys_with(src, m, &opts(&[]), &Unresolved)
}

const DF: &str = "FROM golang:1.7.3 AS builder\nWORKDIR /src\nCOPY app.go .\nRUN go build -o app .\n\nFROM alpine AS web\nCOPY web/ /srv/\n\nFROM alpine:latest\nCOPY --from=builder /src/app .\nCOPY --from=web /srv /srv\nCMD [\"./app\"]\n";

#[test]
fn a_file_no_stage_copies_changes_no_key() {
    let a = keys(DF, &ctx(base_ctx()));
    let mut other = base_ctx();
    other[1] = file("README.md", 0o644, "edited readme");
    other.push(file("new.txt", 0o644, "new"));
    let b = keys(DF, &ctx(other));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.key, y.key, "stage {}", x.index);
    }
}

#[test]
fn editing_a_copied_file_changes_its_stage_and_dependents_only() {
    let a = keys(DF, &ctx(base_ctx()));
    let mut edited = base_ctx();
    edited[0] = file("app.go", 0o644, "package main // v2");
    let b = keys(DF, &ctx(edited));
    assert_ne!(a[0].key, b[0].key, "builder copies app.go");
    assert_eq!(a[1].key, b[1].key, "web does not");
    assert_ne!(a[2].key, b[2].key, "final copies from builder");
    // The chain before the COPY is reused.
    assert_eq!(a[0].chain[0].key, b[0].chain[0].key);
    assert_eq!(a[0].chain[1].key, b[0].chain[1].key);
    assert_ne!(a[0].chain[2].key, b[0].chain[2].key);
}

#[test]
fn mode_bits_count_but_not_where_the_context_lives() {
    let a = keys(DF, &ctx(base_ctx()));
    let mut exec = base_ctx();
    exec[0] = file("app.go", 0o755, "package main");
    assert_ne!(a[0].key, keys(DF, &ctx(exec))[0].key);
    // Same content again: same keys (no absolute paths, mtimes or owners are inputs).
    assert_eq!(a[0].key, keys(DF, &ctx(base_ctx()))[0].key);
}

#[test]
fn directory_sources_take_everything_under_them() {
    let k = keys(DF, &ctx(base_ctx()));
    assert_eq!(k[0].context_files, vec!["app.go"]);
    assert_eq!(k[1].context_files, vec!["web/css/a.css", "web/index.html"]);
    assert!(k[2].context_files.is_empty());
    let mut css = base_ctx();
    css[5] = file("web/css/a.css", 0o644, "a{color:red}");
    assert_ne!(k[1].key, keys(DF, &ctx(css))[1].key);
}

#[test]
fn wildcards_excludes_and_whole_context() {
    let m = ctx(base_ctx());
    let (e, missing) = match_sources(&m, &["*.go", "web/*.html"], &[]);
    let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["app.go", "web/index.html"]);
    assert!(missing.is_empty());
    let (e, _) = match_sources(&m, &["."], &["*.md".into(), "web/css".into()]);
    let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["app.go", "notes.txt", "web", "web/index.html"]);
    let (_, missing) = match_sources(&m, &["nope.txt", "*.rs", "./app.go"], &[]);
    assert_eq!(missing, vec!["nope.txt", "*.rs"]);
}

#[test]
fn missing_sources_are_listed_not_fatal() {
    let k = keys(
        "FROM alpine\nCOPY go.mod go.sum ./\nCOPY app.go .\n",
        &ctx(base_ctx()),
    );
    assert_eq!(k[0].missing, vec!["go.mod", "go.sum"]);
    assert_eq!(k[0].context_files, vec!["app.go"]);
}

#[test]
fn build_args_count_only_where_used() {
    let src = "FROM alpine\nARG USED\nARG UNUSED_HERE\nENV V=$USED\n";
    let m = ctx(vec![]);
    let base = keys_with(
        src,
        &m,
        &opts(&[("USED", "1"), ("UNUSED_HERE", "1")]),
        &Unresolved,
    );
    let used = keys_with(
        src,
        &m,
        &opts(&[("USED", "2"), ("UNUSED_HERE", "1")]),
        &Unresolved,
    );
    let unused = keys_with(
        src,
        &m,
        &opts(&[("USED", "1"), ("UNUSED_HERE", "2")]),
        &Unresolved,
    );
    assert_ne!(base[0].key, used[0].key);
    assert_eq!(base[0].key, unused[0].key);
    // A RUN sees every ARG in scope through its environment.
    let run = "FROM alpine\nARG VERSION\nRUN ./build.sh\n";
    let a = keys_with(run, &m, &opts(&[("VERSION", "1")]), &Unresolved);
    let b = keys_with(run, &m, &opts(&[("VERSION", "2")]), &Unresolved);
    assert_ne!(a[0].key, b[0].key);
    assert!(b[0].chain[2]
        .inputs
        .iter()
        .any(|i| i.name == "build arg VERSION" && i.value == "2"));
}

#[test]
fn spelling_and_layout_do_not_count() {
    let m = ctx(base_ctx());
    let a = keys("FROM alpine\nCOPY app.go /x/\nRUN echo hi\n", &m);
    let b = keys(
        "# a comment\nfrom   alpine\n\ncopy \\\n  app.go /x/\nrun echo hi\n",
        &m,
    );
    assert_eq!(a[0].key, b[0].key);
}

#[test]
fn base_image_resolution_enters_the_key() {
    struct Pinned(&'static str);
    impl BaseResolver for Pinned {
        fn resolve(&self, _: &str) -> Option<String> {
            Some(self.0.to_string())
        }
    }
    let m = ctx(vec![]);
    let src = "FROM alpine\nRUN true\n";
    let a = keys_with(src, &m, &opts(&[]), &Pinned("sha256:aaa"));
    let b = keys_with(src, &m, &opts(&[]), &Pinned("sha256:bbb"));
    let c = keys_with(src, &m, &opts(&[]), &Unresolved);
    assert_ne!(a[0].key, b[0].key);
    assert_ne!(a[0].key, c[0].key);
}

#[test]
fn platform_enters_the_key() {
    let m = ctx(vec![]);
    let mut arm = opts(&[]);
    arm.platform.arch = "arm64".into();
    let a = keys_with("FROM alpine\n", &m, &opts(&[]), &Unresolved);
    let b = keys_with("FROM alpine\n", &m, &arm, &Unresolved);
    assert_ne!(a[0].key, b[0].key);
}

#[test]
fn keys_explain_themselves() {
    let k = keys(DF, &ctx(base_ctx()));
    let copy = &k[0].chain[2];
    assert_eq!(copy.source, "COPY app.go .");
    assert_eq!(copy.line, 3);
    let names: Vec<&str> = copy.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, vec!["previous", "instruction", "file app.go"]);
    assert_eq!(copy.inputs[0].value, k[0].chain[1].key.to_hex());
    let final_from = &k[2].chain[1];
    assert!(final_from
        .inputs
        .iter()
        .any(|i| i.name == "from stage builder" && i.value == k[0].key.to_hex()));
    assert_eq!(k[0].chain[0].inputs[0].name, "base image golang:1.7.3");
    assert_eq!(k[2].key.to_hex(), k[2].chain.last().unwrap().key.to_hex());
    assert_eq!(k[0].key.to_hex().len(), 64);
}

#[test]
fn a_from_stage_read_is_keyed_on_its_content_once_known() {
    let src = "FROM alpine AS a\nRUN make\nFROM alpine AS b\nRUN other\nFROM alpine\nCOPY --from=a /out/ /o\nRUN --mount=from=b,source=/x,target=/x cat /x\nCOPY --from=a /out/* /w/\n";
    let df = parse(src.as_bytes()).unwrap();
    let p = plan(&df, &opts(&[])).unwrap();
    let m = ctx(base_ctx());
    let ks = compute_keys(&p, &m, &Unresolved);
    // Without contents, re-keying changes nothing.
    let same = rekey_stage(&p, 2, &ks, &m, &Unresolved, &NoContents);
    assert_eq!(same.key, ks[2].key);
    let paths = model::keys::content_paths(&p);
    assert_eq!(paths[&0].iter().collect::<Vec<_>>(), ["/out", "/out/*"]);
    assert_eq!(paths[&1].iter().collect::<Vec<_>>(), ["/x"]);
    let contents = |out: &str| {
        std::collections::BTreeMap::from([
            (
                0usize,
                std::collections::BTreeMap::from([
                    ("/out".to_string(), out.to_string()),
                    ("/out/*".to_string(), "w".to_string()),
                ]),
            ),
            (
                1,
                std::collections::BTreeMap::from([("/x".to_string(), "x".to_string())]),
            ),
        ])
    };
    let k1 = rekey_stage(&p, 2, &ks, &m, &Unresolved, &contents("1"));
    assert_ne!(k1.key, ks[2].key);
    let names: Vec<&str> = k1.chain[1].inputs.iter().map(|i| i.name.as_str()).collect();
    assert!(names.contains(&"from stage a /out"), "{names:?}");
    assert!(!names.contains(&"from stage a"), "{names:?}");
    let mount: Vec<&str> = k1.chain[2].inputs.iter().map(|i| i.name.as_str()).collect();
    assert!(mount.contains(&"mount from stage b /x"), "{mount:?}");
    // The same content whatever stage a's key: the same key; other content: another.
    let mut moved = ks.clone();
    moved[0].key = model::keys::StageKey([7; 32]);
    assert_eq!(
        rekey_stage(&p, 2, &moved, &m, &Unresolved, &contents("1")).key,
        k1.key
    );
    assert_ne!(
        rekey_stage(&p, 2, &ks, &m, &Unresolved, &contents("2")).key,
        k1.key
    );
    // A path without a reported content falls back to the stage's key.
    let partial = std::collections::BTreeMap::from([(
        0usize,
        std::collections::BTreeMap::from([("/out".to_string(), "1".to_string())]),
    )]);
    let k = rekey_stage(&p, 2, &ks, &m, &Unresolved, &partial);
    assert!(k.chain[3].inputs.iter().any(|i| i.name == "from stage a"));
}
