//! Stages, ARG scoping, `--from` resolution, target and reachability.
use std::collections::BTreeMap;

use model::frontend::instructions::Instruction;
use model::frontend::parser::parse;
use model::frontend::plan::{plan, Plan, PlanError, PlanOptions, Platform, StageRef};

fn opts(target: Option<&str>, args: &[(&str, &str)]) -> PlanOptions {
    PlanOptions {
        target: target.map(str::to_string),
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        platform: Platform {
            os: "linux".into(),
            arch: "amd64".into(),
            variant: None,
        },
    }
}

fn plan_of(src: &str, o: &PlanOptions) -> Result<Plan, PlanError> {
    let df = parse(src.as_bytes()).expect("parses");
    plan(&df, o)
}

fn ok(src: &str) -> Plan {
    plan_of(src, &opts(None, &[])).unwrap()
}

fn err(src: &str, o: &PlanOptions) -> PlanError {
    match plan_of(src, o) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(e) => e,
    }
}

fn deps(p: &Plan) -> Vec<Vec<usize>> {
    p.stages
        .iter()
        .map(|s| s.depends_on.iter().copied().collect())
        .collect()
}

const HREF: &str = "FROM golang:1.7.3 AS builder\nWORKDIR /src\nCOPY app.go .\nRUN go build -o app .\n\nFROM alpine:latest\nCOPY --from=builder /src/app .\nCMD [\"./app\"]\n";

#[test]
fn seed_example_dag() {
    let p = ok(HREF);
    assert_eq!(p.stages.len(), 2);
    assert_eq!(p.target, 1);
    assert_eq!(p.stages[0].name.as_deref(), Some("builder"));
    assert_eq!(p.stages[0].base, StageRef::Image("golang:1.7.3".into()));
    assert_eq!(deps(&p), vec![vec![], vec![0]]);
    assert_eq!(p.built, vec![true, true]);
}

#[test]
fn target_builder_builds_only_builder() {
    let p = plan_of(HREF, &opts(Some("BUILDER"), &[])).unwrap();
    assert_eq!(p.target, 0);
    assert_eq!(p.built, vec![true, false]);
}

#[test]
fn unknown_target_lists_stage_names() {
    let e = err(HREF, &opts(Some("nope"), &[]));
    assert!(e.message.contains("\"nope\""), "{e}");
    assert!(e.message.contains("builder"), "{e}");
}

#[test]
fn from_index_counts_every_stage() {
    let p = ok("FROM a\nFROM b AS named\nFROM c\nCOPY --from=0 /x /x\nCOPY --from=1 /y /y\n");
    assert_eq!(deps(&p)[2], vec![0, 1]);
    assert_eq!(p.built, vec![true, true, true]);
}

#[test]
fn external_image_in_from_flag() {
    let p = ok("FROM alpine\nCOPY --from=nginx:latest /etc/nginx /etc/nginx\n");
    assert!(p.stages[0].depends_on.is_empty());
    assert_eq!(
        p.stages[0].instructions[0].copy_from,
        Some(StageRef::Image("nginx:latest".into()))
    );
}

#[test]
fn stage_names_are_case_insensitive() {
    let p = ok("FROM alpine AS Build\nFROM BUILD\nCOPY --from=bUiLd /a /a\n");
    assert_eq!(p.stages[1].base, StageRef::Stage(0));
    assert_eq!(deps(&p)[1], vec![0]);
}

#[test]
fn diamond() {
    let p = ok("FROM alpine AS base\nFROM base AS left\nFROM base AS right\nFROM left\nCOPY --from=right /r /r\nFROM alpine AS unused\n");
    assert_eq!(deps(&p), vec![vec![], vec![0], vec![0], vec![1, 2], vec![]]);
    assert_eq!(p.target, 4);
    assert_eq!(p.built, vec![false, false, false, false, true]);
    let p = plan_of(
        "FROM alpine AS base\nFROM base AS left\nFROM base AS right\nFROM left AS final\nCOPY --from=right /r /r\nFROM alpine AS unused\nRUN false\n",
        &opts(Some("final"), &[]),
    )
    .unwrap();
    assert_eq!(p.built, vec![true, true, true, true, false]);
}

#[test]
fn run_mount_from_is_a_dependency() {
    let p =
        ok("FROM alpine AS deps\nFROM alpine\nRUN --mount=type=bind,from=deps,target=/d ls /d\n");
    assert_eq!(deps(&p)[1], vec![0]);
}

#[test]
fn variables_in_from_flag_are_rejected_with_advice() {
    let e = err(
        "ARG S=a\nFROM alpine AS a\nFROM alpine\nCOPY --from=$S /x /x\n",
        &opts(None, &[]),
    );
    assert_eq!(e.line, Some(4));
    assert!(
        e.message
            .contains("variable expansion is not supported for --from"),
        "{e}"
    );
    assert!(e.message.contains("ARG from global scope"), "{e}");
}

#[test]
fn later_and_self_references_are_errors() {
    let e = err(
        "FROM alpine AS a\nCOPY --from=b /x /x\nFROM alpine AS b\n",
        &opts(None, &[]),
    );
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("later"), "{e}");
    let e = err("FROM alpine AS a\nCOPY --from=a /x /x\n", &opts(None, &[]));
    assert!(e.message.contains("circular"), "{e}");
    let e = err("FROM alpine\nCOPY --from=0 /x /x\n", &opts(None, &[]));
    assert!(e.message.contains("circular"), "{e}");
    let e = err(
        "FROM alpine\nFROM alpine\nCOPY --from=5 /x /x\n",
        &opts(None, &[]),
    );
    assert!(e.message.contains("invalid stage index"), "{e}");
    let e = err("FROM later\nFROM alpine AS later\n", &opts(None, &[]));
    assert!(e.message.contains("later"), "{e}");
}

#[test]
fn global_args_only_in_from_unless_redeclared() {
    let src = "ARG VERSION=1.0\nARG IMG=alpine\nFROM $IMG:${VERSION}\nENV A=$VERSION\nARG VERSION\nENV B=$VERSION\n";
    let p = ok(src);
    assert_eq!(p.stages[0].base, StageRef::Image("alpine:1.0".into()));
    let envs: Vec<_> = p.stages[0]
        .instructions
        .iter()
        .filter_map(|i| match &i.instruction {
            Instruction::Env(kv) => Some(kv[0].1.clone()),
            _ => None,
        })
        .collect();
    // Before re-declaration the global ARG is invisible; the base is external, so the
    // reference is kept for the image's own ENV.
    assert_eq!(envs, vec!["$VERSION".to_string(), "1.0".to_string()]);
    let p = plan_of(src, &opts(None, &[("VERSION", "2.0")])).unwrap();
    assert_eq!(p.stages[0].base, StageRef::Image("alpine:2.0".into()));
}

#[test]
fn build_arg_overrides_stage_default_and_run_sees_args() {
    let src = "FROM scratch\nARG V=1\nARG W\nRUN echo\nENV X=$V-$W-$NOPE\n";
    let p = plan_of(src, &opts(None, &[("V", "9")])).unwrap();
    let run = &p.stages[0].instructions[2];
    assert_eq!(run.build_args.get("V").map(String::as_str), Some("9"));
    assert!(!run.build_args.contains_key("W"));
    match &p.stages[0].instructions[3].instruction {
        // scratch has no image ENV: unknown variables are empty, as in Docker.
        Instruction::Env(kv) => assert_eq!(kv[0].1, "9--"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn platform_args() {
    let p = ok(
        "FROM --platform=$BUILDPLATFORM alpine AS b\nARG TARGETARCH\nENV T=$TARGETARCH\nFROM b\n",
    );
    assert_eq!(p.stages[0].platform.as_deref(), Some("linux/amd64"));
    match &p.stages[0].instructions[1].instruction {
        Instruction::Env(kv) => assert_eq!(kv[0].1, "amd64"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn env_shadows_arg_and_applies_after_the_instruction() {
    let p = ok("FROM scratch\nARG A=arg\nENV A=env B=$A\nENV C=$A\n");
    let vals: Vec<_> = p.stages[0]
        .instructions
        .iter()
        .filter_map(|i| match &i.instruction {
            Instruction::Env(kv) => Some(kv.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(vals[0][1], ("B".to_string(), "arg".to_string()));
    assert_eq!(vals[1][0], ("C".to_string(), "env".to_string()));
}

#[test]
fn env_is_inherited_from_a_parent_stage() {
    let p = ok("FROM scratch AS a\nENV P=/opt\nFROM a\nWORKDIR $P/app\n");
    match &p.stages[1].instructions[0].instruction {
        Instruction::Workdir(w) => assert_eq!(w, "/opt/app"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn blank_base_name_is_an_error() {
    let e = err("ARG IMG\nFROM $IMG\n", &opts(None, &[]));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("should not be blank"), "{e}");
}

#[test]
fn instructions_before_from_and_unknown_instructions() {
    let e = err("RUN x\nFROM alpine\n", &opts(None, &[]));
    assert_eq!(e.line, Some(1));
    let e = err("FROM alpine\nFOO bar\n", &opts(None, &[]));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("unknown instruction"), "{e}");
    let e = err("FROM alpine\nCOPY --form=x a b\n", &opts(None, &[]));
    assert!(e.message.contains("unknown flag: --form"), "{e}");
}

#[test]
fn onbuild_triggers_of_a_base_stage_run_in_the_child() {
    let p =
        ok("FROM alpine AS dep\nFROM alpine AS base\nONBUILD COPY --from=dep /x /x\nFROM base\n");
    assert_eq!(deps(&p)[2], vec![0, 1]);
    assert!(p.stages[2].instructions[0].from_onbuild);
}

#[test]
fn typed_flags() {
    let p = ok("FROM alpine\nCOPY --chown=1:2 --chmod=755 --link --exclude=*.md --exclude=x a b /d/\nADD --checksum=sha256:abc --keep-git-dir https://example.com/x /y\nRUN --mount=type=cache,target=/c --mount=type=secret,id=s --network=none --security=sandbox true\n");
    match &p.stages[0].instructions[0].instruction {
        Instruction::Copy(c) => {
            assert_eq!(c.chown.as_deref(), Some("1:2"));
            assert_eq!(c.chmod.as_deref(), Some("755"));
            assert!(c.link);
            assert_eq!(c.excludes, vec!["*.md", "x"]);
            assert_eq!(c.sources, vec!["a", "b"]);
            assert_eq!(c.dest, "/d/");
        }
        other => panic!("{other:?}"),
    }
    match &p.stages[0].instructions[2].instruction {
        Instruction::Run(r) => {
            assert_eq!(r.mounts.len(), 2);
            assert_eq!(r.network.as_deref(), Some("none"));
        }
        other => panic!("{other:?}"),
    }
}

/// The shape of the big real Dockerfiles (BuildKit's, moby's, buildx's): stages picked by
/// platform ARGs, external `--from` images with digests, mounts without a target, heredocs.
#[test]
fn large_real_world_shaped_dockerfile() {
    let src = include_str!("fixtures/bigproject.Dockerfile");
    let p = plan_of(src, &opts(None, &[])).unwrap();
    let index = |name: &str| {
        p.stages
            .iter()
            .position(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    let names = |v: &std::collections::BTreeSet<usize>| -> Vec<String> {
        v.iter().map(|i| p.stages[*i].display_name()).collect()
    };
    assert_eq!(p.stages.len(), 25);
    assert_eq!(p.stages[p.target].name.as_deref(), Some("app"));
    assert_eq!(
        p.stages[index("alpinebase")].base,
        StageRef::Stage(index("alpine-amd64"))
    );
    assert_eq!(
        p.stages[index("binaries")].base,
        StageRef::Stage(index("binaries-linux"))
    );
    assert_eq!(
        p.stages[index("app")].base,
        StageRef::Stage(index("app-linux"))
    );
    assert_eq!(
        names(&p.stages[index("appctl")].depends_on),
        vec!["gobase", "version"]
    );
    assert_eq!(
        names(&p.stages[index("tool")].depends_on),
        vec!["gobase", "tool-src"]
    );
    assert_eq!(
        names(&p.stages[index("binaries-linux")].depends_on),
        vec!["tool", "appctl", "appd"]
    );
    assert_eq!(
        names(&p.stages[index("releaser")].depends_on),
        vec!["version", "binaries"]
    );
    assert_eq!(
        p.stages[index("golatest")].base,
        StageRef::Image("golang:1.22-alpine3.19".into())
    );
    assert_eq!(
        p.stages[index("xx")].platform.as_deref(),
        Some("linux/amd64")
    );
    let built: Vec<String> = p
        .stages
        .iter()
        .filter(|s| p.built[s.index])
        .map(|s| s.display_name())
        .collect();
    assert_eq!(
        built,
        vec![
            "alpine-amd64",
            "alpinebase",
            "xx",
            "golatest",
            "git",
            "gobase",
            "tool-src",
            "tool",
            "version",
            "appctl",
            "appd",
            "binaries-linux",
            "binaries",
            "app-export",
            "app-linux",
            "app"
        ]
    );
    // With the debug build arg the target switches to the debug stage.
    let p2 = plan_of(src, &opts(None, &[("APP_DEBUG", "1")])).unwrap();
    assert_eq!(
        p2.stages[p2.target].base,
        StageRef::Stage(index("app-linux-debug"))
    );
    // Another platform picks other stages.
    let mut arm = opts(Some("binaries"), &[]);
    arm.platform.os = "darwin".into();
    arm.platform.arch = "arm64".into();
    let p3 = plan_of(src, &arm).unwrap();
    assert_eq!(
        p3.stages[index("binaries")].base,
        StageRef::Stage(index("binaries-darwin"))
    );
    assert_eq!(
        p3.stages[index("alpinebase")].base,
        StageRef::Stage(index("alpine-arm64"))
    );
}

#[test]
fn syntax_directive_names_only_the_standard_frontend() {
    for ok in [
        "docker/dockerfile:1",
        "docker/dockerfile:1.7-labs",
        "docker.io/docker/dockerfile:1",
        "docker/dockerfile-upstream:master",
        "docker/dockerfile@sha256:abc",
    ] {
        plan_of(&format!("# syntax={ok}\nFROM alpine\n"), &opts(None, &[])).unwrap();
    }
    let e = err(
        "# syntax=example.com/my/frontend:1\nFROM alpine\n",
        &opts(None, &[]),
    );
    assert_eq!(e.line, Some(1));
    assert!(e.message.contains("example.com/my/frontend:1"), "{e}");
}

#[test]
fn a_stage_built_from_a_stage_inherits_its_args() {
    // BuildKit: ARG values in scope at the end of a stage are still set in a stage built
    // FROM it (checked against this daemon's BuildKit).
    let p = ok("FROM scratch AS parent\nARG X=from-parent\nFROM parent\nENV Y=$X\nRUN true\n");
    match &p.stages[1].instructions[0].instruction {
        Instruction::Env(kv) => assert_eq!(kv[0].1, "from-parent"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.stages[1].instructions[1]
            .build_args
            .get("X")
            .map(String::as_str),
        Some("from-parent")
    );
}
