//! BuildKit parity: every case in `tests/corpus/` is built by this daemon's BuildKit
//! (`DOCKER_BUILDKIT=1 /usr/bin/docker build --network=none`) and by `dbuild submit`; the
//! two images must have the same filesystem (type, mode bits, owner, size, content digest,
//! link target of every path; never mtimes) and the same runtime config (Env, Cmd,
//! Entrypoint, WorkingDir, User, Labels, ExposedPorts, Volumes, StopSignal, Healthcheck,
//! Shell, OnBuild). A difference fails the test with one line per differing path or field,
//! BuildKit on the left, dbuild on the right.
//!
//! `harness::*` checks the harness itself (BuildKit against BuildKit), `parity::*` runs the
//! corpus, `examples::*` the href-counter example, `dbuild_only::*` what this BuildKit cannot
//! build (heredocs), checked against the expected result directly.
//!
//! Run: `cargo test --test e2e_buildkit_parity` (`DBUILD_E2E_KEEP=1` keeps the images).

use std::fs;
use std::path::Path;

use testkit::*;

/// One `#[test]` per corpus case, named after its folder; `CASES` lists them so a folder
/// without a test is caught.
macro_rules! parity_cases {
    ($($name:ident),* $(,)?) => {
        mod parity {
            $(
                #[test]
                fn $name() {
                    testkit::corpus_parity(stringify!($name));
                }
            )*
        }
        const PARITY_CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

parity_cases!(
    add_local,
    base_env,
    cmd_entrypoint,
    copy_exclude,
    copy_from,
    copy_link,
    copy_ownership,
    copy_parents,
    copy_paths,
    copy_symlinks,
    dockerignore,
    entrypoint_resets_cmd,
    env_arg,
    healthcheck_none,
    metadata,
    multistage_diamond,
    onbuild,
    run_forms,
    run_mounts,
    run_network,
    scratch,
    segments,
    shell_forms,
    stage_args,
    target,
    user_groups,
    workdir_user,
);

/// Corpus cases checked by their own test instead of by parity.
const DIRECT_CASES: &[&str] = &["heredoc"];

mod harness {
    use super::*;

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(
            sha256::hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256::hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Crosses a block boundary with the padding (56..64 bytes) and several blocks.
        assert_eq!(
            sha256::hex(&[b'a'; 1000]),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
        assert_eq!(
            sha256::hex(&[b'x'; 60]),
            "42f2d97335669f86846b721a8aa58551a46564eaf6977e3b4836d4645e3e3ed2"
        );
    }

    fn layer(build: impl FnOnce(&mut tarball::Writer)) -> Vec<u8> {
        let mut w = tarball::Writer::default();
        build(&mut w);
        w.finish()
    }

    #[test]
    fn flatten_applies_whiteouts_opaque_dirs_and_hardlinks() {
        let lower = layer(|w| {
            w.dir("a", 0o755, (0, 0))
                .file("a/x", 0o644, (0, 0), b"x")
                .file("a/y", 0o600, (1, 2), b"y")
                .dir("b", 0o755, (0, 0))
                .file("b/keep", 0o644, (0, 0), b"k")
                .dir("c", 0o755, (0, 0))
                .file("c/inner", 0o644, (0, 0), b"i")
                .file("d", 0o644, (0, 0), b"d")
                .dir("proc", 0o555, (0, 0))
                .file(".dockerenv", 0o644, (0, 0), b"");
        });
        let upper = layer(|w| {
            w.dir("a", 0o700, (0, 0))
                .file("a/.wh..wh..opq", 0o644, (0, 0), b"")
                .file("a/z", 0o644, (0, 0), b"z")
                .file(".wh.d", 0o644, (0, 0), b"")
                .file("b/.wh.keep", 0o644, (0, 0), b"")
                .file("c", 0o4755, (0, 0), b"now a file")
                .hardlink("a/z2", "a/z")
                .symlink("s", "a/z");
        });
        let (fs, contents) = snapshot::flatten(&[lower, upper]).unwrap();
        let paths: Vec<&str> = fs.keys().map(String::as_str).collect();
        assert_eq!(paths, ["/a", "/a/z", "/a/z2", "/b", "/c", "/s"]);
        assert_eq!(fs["/a"].mode, 0o700);
        assert_eq!(fs["/c"].kind, snapshot::Kind::File);
        assert_eq!(fs["/c"].mode, 0o4755);
        // A hardlink reads as a file like its target; the group is recorded on both ends.
        assert_eq!(fs["/a/z2"].kind, snapshot::Kind::File);
        assert_eq!(fs["/a/z2"].digest, fs["/a/z"].digest);
        assert_eq!(fs["/a/z2"].hardlinks, ["/a/z"]);
        assert_eq!(fs["/a/z"].hardlinks, ["/a/z2"]);
        assert!(fs["/a/z"]
            .describe(None)
            .ends_with("(hardlinked with /a/z2)"));
        assert_eq!(fs["/s"].link.as_deref(), Some("a/z"));
        assert_eq!(contents["/a/z"], b"z");
        assert_eq!(
            fs["/c"].describe(Some(b"now a file")),
            format!(
                "file 4755 0:0 10B sha256:{} \"now a file\"",
                &sha256::hex(b"now a file")[..12]
            )
        );
    }

    #[test]
    fn tar_reader_reads_pax_and_gnu_long_names() {
        // A PAX header carrying a long path and a big uid, then its file.
        let long = format!("{}/file.txt", "d".repeat(150));
        let mut w = tarball::Writer::default();
        // PAX records are "LEN key=value\n", LEN counting itself.
        let record = |k: &str, v: &str| {
            let tail = format!(" {k}={v}\n");
            let mut len = tail.len() + 1;
            while len.to_string().len() + tail.len() != len {
                len += 1;
            }
            format!("{len}{tail}")
        };
        let pax = format!("{}{}", record("path", &long), record("uid", "2000000"));
        w.file("PaxHeaders/x", 0o644, (0, 0), pax.as_bytes());
        let mut bytes = w.finish();
        bytes[156] = b'x'; // turn the first member into a PAX extended header
        fix_checksum(&mut bytes[..512]);
        bytes.truncate(bytes.len() - 1024);
        let mut w2 = tarball::Writer::default();
        w2.file("short", 0o640, (0, 0), b"content");
        bytes.extend(w2.finish());
        let members = tarball::read(&bytes).unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].name, long);
        assert_eq!(members[0].uid, 2_000_000);
        assert_eq!(members[0].data, b"content");
    }

    fn fix_checksum(h: &mut [u8]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&c| u32::from(c)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    #[test]
    fn base_images_exist_and_work() {
        base_images();
        assert_eq!(
            run_image(images::ALPINE, &["id", "app"]).trim(),
            "uid=1000(app) gid=1000(app) groups=1000(app)"
        );
        let out = run_image(
            images::GOLANG,
            &[
                "sh",
                "-c",
                "mkdir -p /go/src/x && cd /go/src/x && echo 'package main' > m.go \
                 && go build -o app . && ./app",
            ],
        );
        assert_eq!(out.trim(), images::FAKE_GO_OUTPUT);
        assert_eq!(
            run_image(images::NGINX, &["cat", "/etc/nginx/nginx.conf"]),
            images::NGINX_CONF
        );
        let onbuild = docker_ok(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.OnBuild}}",
            images::ONBUILD,
        ]);
        assert!(
            onbuild.stdout_text().contains("onbuild-trigger-ran"),
            "{}",
            onbuild.stdout_text()
        );
        // A second call is a no-op (and cheap): the images carry their spec label.
        base_images();
    }

    /// The same case built twice by BuildKit, the second time without its cache (new image
    /// id, new mtimes), compares equal: the snapshot only sees what a build determines.
    #[test]
    fn buildkit_twice_compares_equal() {
        base_images();
        let case = Case::load("run_forms");
        let first = buildkit_build(&case.spec(), &unique_tag("harness-twice-1"))
            .unwrap_or_else(|r| panic!("{}", r.report()));
        let mut again = case.spec();
        again.flags.push("--no-cache".into());
        let second = buildkit_build(&again, &unique_tag("harness-twice-2"))
            .unwrap_or_else(|r| panic!("{}", r.report()));
        let (a, b) = (first.snapshot(), second.snapshot());
        assert_ne!(a.id, b.id, "--no-cache should have made a new image");
        assert!(a.fs.len() > 250, "a busybox image has hundreds of paths");
        assert_same_image(&a, &b);
    }

    /// Two deliberately different images: the comparison lists exactly the differing paths
    /// and fields, prints them side by side, and fails.
    #[test]
    fn different_images_give_a_readable_diff() {
        base_images();
        let a = context(&[
            ("f.txt", "same name, first content\n"),
            (
                "Dockerfile",
                "FROM alpine:latest\nCOPY f.txt /f.txt\nRUN chmod 600 /f.txt && echo a > /only-a.txt && echo same > /same.txt\nENV X=1 Y=kept\nCMD [\"a\"]\n",
            ),
        ]);
        let b = context(&[
            ("f.txt", "same name, other content\n"),
            (
                "Dockerfile",
                "FROM alpine:latest\nCOPY f.txt /f.txt\nRUN ln -s /same.txt /only-b && echo same > /same.txt\nENV X=2 Y=kept\nCMD [\"b\"]\nLABEL extra=1\n",
            ),
        ]);
        let ia = buildkit_build(&BuildSpec::new(a.path()), &unique_tag("harness-diff-a"))
            .unwrap_or_else(|r| panic!("{}", r.report()));
        let ib = buildkit_build(&BuildSpec::new(b.path()), &unique_tag("harness-diff-b"))
            .unwrap_or_else(|r| panic!("{}", r.report()));
        let (sa, sb) = (ia.snapshot(), ib.snapshot());
        let diffs = differences(&sa, &sb);
        let whats: Vec<&str> = diffs.iter().map(|d| d.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "/f.txt",
                "/only-a.txt",
                "/only-b",
                "config.Env X",
                "config.Cmd",
                "config.Labels[\"extra\"]"
            ],
            "{}",
            render(&diffs, "a", "b")
        );
        let table = render(&diffs, "expected (BuildKit)", "actual (dbuild)");
        println!("{table}");
        let line = |what: &str| {
            table
                .lines()
                .find(|l| l.starts_with(what))
                .unwrap_or_else(|| panic!("no line for {what} in\n{table}"))
                .to_string()
        };
        assert!(table.starts_with("path/field"), "{table}");
        let f = line("/f.txt");
        assert!(f.contains("file 0600 0:0 25B sha256:"), "{f}");
        assert!(f.contains("| file 0644 0:0 25B sha256:"), "{f}");
        assert!(f.contains("\"same name, first content\\n\""), "{f}");
        assert!(line("/only-a.txt").ends_with("| (absent)"));
        assert!(line("/only-b").contains("(absent)"));
        assert!(line("/only-b").ends_with("| symlink 0777 0:0 -> /same.txt"));
        assert!(line("config.Env X").contains("X=1"));
        assert!(line("config.Env X").ends_with("| X=2"));
        assert!(line("config.Cmd").contains("[\"a\"]"));
        assert!(line("config.Labels").ends_with("| \"1\""));
        let failure = std::panic::catch_unwind(|| assert_same_image(&sa, &sb))
            .expect_err("different images must fail the comparison");
        let msg = failure
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(msg.contains("images differ in 6 path(s)/field(s)"), "{msg}");
        assert!(msg.contains(&f), "{msg}");
        // Differing small text files also get a line diff under the table.
        assert!(
            msg.contains(
                "--- /f.txt (- expected, BuildKit / + actual, dbuild)\n - same name, first content\n + same name, other content\n"
            ),
            "{msg}"
        );
    }

    /// Cases with a `Dockerfile.buildkit` exist because this BuildKit rejects their
    /// Dockerfile; once it accepts one, compare against the real thing instead.
    #[test]
    fn references_are_only_used_where_buildkit_cannot_build() {
        base_images();
        let mut checked = Vec::new();
        for name in corpus::names() {
            let case = Case::load(&name);
            if case.reference_spec().is_none() && !DIRECT_CASES.contains(&name.as_str()) {
                continue;
            }
            let r = buildkit_build(&case.spec(), &unique_tag(&format!("harness-ref-{name}")));
            match r {
                Ok(_) => panic!(
                    "this BuildKit now builds corpus/{name}/Dockerfile: compare dbuild against it \
                     directly (drop Dockerfile.buildkit / move the case into parity_cases!)"
                ),
                Err(run) => {
                    let err = run.stderr_text();
                    assert!(
                        err.contains("Unknown flag") || err.contains("unknown instruction"),
                        "{name}: BuildKit failed for another reason than syntax:\n{}",
                        run.report()
                    );
                }
            }
            checked.push(name);
        }
        assert_eq!(
            checked,
            [
                "copy_exclude",
                "copy_link",
                "copy_parents",
                "heredoc",
                "run_network"
            ]
        );
    }

    #[test]
    fn text_diff_shows_changed_lines_in_context() {
        assert_eq!(
            compare::text_diff("a\nb\nc\n", "a\nB\nc\nd\n"),
            "   a\n - b\n + B\n   c\n + d\n"
        );
        assert_eq!(
            compare::text_diff("x\n", "x"),
            "   x\n (the two differ in a final newline)\n"
        );
    }

    #[test]
    fn args_files_split_into_flags_with_secret_paths_made_absolute() {
        let flags = corpus::parse_args(
            "# a comment\n--target builder\n--build-arg V=2   --no-cache\n--secret id=s,src=dir/s.txt\n--secret id=t,src=/abs\n",
            Path::new("/case"),
        );
        assert_eq!(
            flags,
            [
                "--target",
                "builder",
                "--build-arg",
                "V=2",
                "--no-cache",
                "--secret",
                "id=s,src=/case/dir/s.txt",
                "--secret",
                "id=t,src=/abs"
            ]
        );
    }

    #[test]
    fn every_corpus_case_has_a_test() {
        let mut listed: Vec<&str> = PARITY_CASES.iter().chain(DIRECT_CASES).copied().collect();
        listed.sort();
        assert_eq!(corpus::names(), listed);
    }

    /// Together the cases use every Dockerfile instruction and every flag dbuild accepts.
    #[test]
    fn corpus_covers_every_instruction_and_flag() {
        let mut all = String::new();
        for name in corpus::names() {
            let dir = corpus::corpus_dir().join(&name);
            for f in ["Dockerfile", "args", ".dockerignore"] {
                if let Ok(t) = fs::read_to_string(dir.join(f)) {
                    all.push_str(&format!("\n#### {name}/{f}\n{t}"));
                }
            }
        }
        let needles = [
            // instructions
            "\nFROM ",
            "\nARG ",
            "\nENV ",
            "\nWORKDIR ",
            "\nUSER ",
            "\nSHELL ",
            "\nCMD ",
            "\nENTRYPOINT ",
            "\nLABEL ",
            "\nEXPOSE ",
            "\nVOLUME ",
            "\nSTOPSIGNAL ",
            "\nHEALTHCHECK ",
            "\nONBUILD ",
            "\nCOPY ",
            "\nADD ",
            "\nRUN ",
            // forms
            "ENV KEY1=value1 KEY2=\"two words\"",
            "ENV LEGACY legacy",
            "ARG BASE=alpine",
            "FROM ${BASE}",
            "ARG NO_DEFAULT\n",
            "WORKDIR app\n",
            "USER app\n",
            "USER 1000:1000",
            "CMD echo",
            "CMD [\"",
            "ENTRYPOINT echo",
            "ENTRYPOINT [\"",
            "EXPOSE 80 53/udp",
            "VOLUME [\"/data\"]",
            "VOLUME /cache",
            "HEALTHCHECK NONE",
            "--interval=",
            "--timeout=",
            "--start-period=",
            "--retries=",
            "RUN [\"",
            "ONBUILD RUN",
            "FROM dbuild-test/onbuild:latest",
            // COPY / ADD
            "--chown=app:app",
            "--chown=1234:5678",
            "--chmod=",
            "--link",
            "--parents",
            "--exclude=",
            "COPY *.txt",
            "COPY dir /contents/",
            "--from=first",
            "--from=1 ",
            "--from=nginx:latest",
            "ADD archive.tar ",
            "ADD archive.tar.gz",
            "ADD --chown=",
            "COPY link-to-file",
            // RUN flags
            "--network=none",
            "--mount=type=bind,source=",
            "--mount=type=bind,from=",
            "--mount=type=cache,id=",
            "sharing=locked",
            "sharing=shared",
            "sharing=private",
            "--mount=type=tmpfs",
            "--mount=type=secret,id=",
            // heredocs
            "RUN <<EOF",
            "COPY <<EOF",
            "COPY <<one.txt <<two.txt",
            "<<-EOT",
            "RUN cat <<FIRST > /two-first.txt && cat <<SECOND",
            // build flags (args files) and .dockerignore
            "--target builder",
            "--build-arg ",
            "--secret id=",
            "!important.log",
            // an unreachable stage that would fail
            "AS broken\nRUN false",
        ];
        let missing: Vec<&str> = needles
            .iter()
            .copied()
            .filter(|n| !all.contains(n))
            .collect();
        assert!(missing.is_empty(), "no corpus case uses: {missing:#?}");
    }
}

mod examples {
    use super::*;

    fn example() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/href-counter")
    }

    #[test]
    fn href_counter() {
        assert_parity("href-counter", &BuildSpec::new(example()), None);
    }

    #[test]
    fn href_counter_from_index() {
        let spec = BuildSpec::new(example()).file(example().join("Dockerfile.from-index"));
        assert_parity("href-counter-from-index", &spec, None);
    }

    #[test]
    fn href_counter_target_builder() {
        let spec = BuildSpec::new(example()).flags(&["--target", "builder"]);
        assert_parity("href-counter-builder", &spec, None);
    }

    #[test]
    fn href_counter_external() {
        let spec = BuildSpec::new(example()).file(example().join("Dockerfile.external"));
        assert_parity("href-counter-external", &spec, None);
    }
}

mod dbuild_only {
    use super::*;

    /// Heredocs, which this BuildKit cannot parse: the dbuild image is checked against what
    /// BuildKit 1.4+ makes of them (RUN runs the body with the shell, or as a script when it
    /// starts with `#!`; COPY writes the body as a 0644 root-owned file, expanding variables
    /// unless the delimiter is quoted; `<<-` strips leading tabs).
    #[test]
    fn heredoc() {
        base_images();
        let case = Case::load("heredoc");
        let data = testkit::data_dir();
        let image = dbuild_build(&case.spec(), &unique_tag("heredoc"), data.path())
            .unwrap_or_else(|r| panic!("dbuild submit failed\n{}", r.report()));
        let s = image.snapshot();
        let file = |path: &str, mode: u32, owner: (u64, u64), body: &str| {
            let e = s
                .entry(path)
                .unwrap_or_else(|| panic!("{path} is missing from the image"));
            assert_eq!(e.kind, snapshot::Kind::File, "{path}: {}", s.describe(path));
            assert_eq!(
                (e.mode, e.uid, e.gid),
                (mode, owner.0, owner.1),
                "{path}: {}",
                s.describe(path)
            );
            assert_eq!(s.text(path), body, "{path}");
        };
        file(
            "/run-script.txt",
            0o644,
            (0, 0),
            "script line 1\nscript line 2\n",
        );
        file("/shebang.txt", 0o644, (0, 0), "ran with a shebang\n");
        file("/stdin.txt", 0o644, (0, 0), "fed to sh on stdin\n");
        file("/two-first.txt", 0o644, (0, 0), "first body\n");
        file("/two-second.txt", 0o644, (0, 0), "second body\n");
        file("/copied/expanded.txt", 0o644, (0, 0), "hello world\n");
        file("/copied/literal.txt", 0o644, (0, 0), "$GREETING world\n");
        file("/many/one.txt", 0o644, (0, 0), "content one\n");
        file("/many/two.txt", 0o644, (0, 0), "content two\n");
        file("/dash.txt", 0o644, (0, 0), "tabs stripped\n");
        file(
            "/usr/local/bin/hello",
            0o755,
            (1000, 1000),
            "#!/bin/sh\necho hello from a heredoc\n",
        );
        for dir in ["/copied", "/many"] {
            assert_eq!(
                s.describe(dir),
                "dir 0755 0:0",
                "{dir} is created like any COPY destination"
            );
        }
        // Nothing else appeared at the top level: heredoc bodies are not left behind.
        let base = Snapshot::of(images::ALPINE);
        let new: Vec<&String> =
            s.fs.keys()
                .filter(|p| p.matches('/').count() == 1 && !base.fs.contains_key(*p))
                .collect();
        assert_eq!(
            new,
            [
                "/copied",
                "/dash.txt",
                "/many",
                "/run-script.txt",
                "/shebang.txt",
                "/stdin.txt",
                "/two-first.txt",
                "/two-second.txt"
            ]
        );
        assert_eq!(
            run_image(&image.tag, &["hello"]).trim(),
            "hello from a heredoc"
        );
        assert_eq!(s.config["Env"][1], "GREETING=hello");
    }
}
