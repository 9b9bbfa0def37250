//! `.dockerignore` semantics: Docker's documented examples, moby/patternmatcher's and Go's
//! `filepath.Match` test tables, and properties.
use model::context::ignore::{clean_path, parse_dockerignore, MatchInfo};
use model::context::{path_match, read_ignore_patterns, ContextError, IgnoreMatcher};
use proptest::prelude::*;

fn matcher(dockerignore: &str) -> IgnoreMatcher {
    IgnoreMatcher::new(&parse_dockerignore(dockerignore)).expect("valid patterns")
}

/// Matches `path` the way the walker does: feeding each ancestor's `MatchInfo` down.
fn walk_match(m: &IgnoreMatcher, path: &str) -> bool {
    let mut info = MatchInfo::default();
    let parts: Vec<&str> = path.split('/').collect();
    for i in 1..parts.len() {
        info = m.matches_using_parent(&parts[..i].join("/"), &info).1;
    }
    m.matches_using_parent(path, &info).0
}

#[test]
fn docker_documented_examples() {
    #[rustfmt::skip]
    let table: &[(&str, &str, bool)] = &[
        // *.dockerignore docs: "# comment\n*/temp*\n*/*/temp*\ntemp?"
        ("*/temp*", "somedir/temporary.txt", true),
        ("*/temp*", "somedir/temp", true),
        ("*/temp*", "somedir/temp/inner.txt", true),
        ("*/temp*", "temporary.txt", false),
        ("*/temp*", "a/b/temporary.txt", false),
        ("*/*/temp*", "somedir/subdir/temporary.txt", true),
        ("*/*/temp*", "somedir/temporary.txt", false),
        ("temp?", "tempa", true),
        ("temp?", "tempb/file", true),
        ("temp?", "temp", false),
        ("temp?", "tempab", false),
        ("**/*.go", "main.go", true),
        ("**/*.go", "a/b/c/main.go", true),
        ("**/*.go", "a/b/main.go.txt", false),
        ("*.md\n!README.md", "README.md", false),
        ("*.md\n!README.md", "CHANGES.md", true),
        ("*.md\n!README*.md\nREADME-secret.md", "README-public.md", false),
        ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", true),
        ("*.md\n!README*.md\nREADME-secret.md", "NOTES.md", true),
        // a leading / is the context root, a trailing / is dropped by Clean
        ("/foo", "foo", true),
        ("/foo", "foo/bar", true),
        ("/foo", "x/foo", false),
        ("foo/", "foo", true),
        ("foo/", "foo/bar.txt", true),
        ("foo/", "foobar", false),
        // filepath.Clean
        ("./foo/../bar", "bar", true),
        ("./foo/../bar", "foo", false),
        ("a//b/./c/", "a/b/c/d", true),
        ("!./keep\n*", "keep", true), // exception first, then "*" wins
        ("*\n!./keep", "keep", false),
        // character classes
        ("file[a-c].txt", "fileb.txt", true),
        ("file[a-c].txt", "filed.txt", false),
        ("file[^a-c].txt", "filed.txt", true),
        ("file[!a-c].txt", "file!.txt", true), // `!` is not negation in Go
        ("file[!a-c].txt", "filed.txt", false),
        (r"file\*.txt", "file*.txt", true),
        (r"file\*.txt", "fileX.txt", false),
        // comments, blanks and whitespace
        ("# comment\n\n   \nfoo", "foo", true),
        ("# foo", "# foo", false),
        ("  # foo", "# foo", true), // only column-0 # is a comment (moby ReadAll)
        ("\u{feff}bar", "bar", true),
        ("  foo  \r\n", "foo", true),
        ("! foo\nfoo\n!  foo", "foo", false),
        // last match wins, exceptions re-include things in excluded dirs
        ("docs\n!docs/README.md", "docs/README.md", false),
        ("docs\n!docs/README.md", "docs/other.md", true),
        ("docs/*\n!docs/README.md", "docs/README.md", false),
        ("!docs/README.md\ndocs", "docs/README.md", true),
        // patternmatcher quirks kept on purpose
        ("**foo", "xfoo", true),
        ("foo**", "foobar", true),
        ("**", "anything/at/all", true),
        (".*", ".git/config", true),
        (".*", "a/.hidden", false),
    ];
    for (ignore, path, want) in table {
        let m = matcher(ignore);
        assert_eq!(m.matches(path), *want, "{ignore:?} vs {path:?}");
        assert_eq!(walk_match(&m, path), *want, "walk: {ignore:?} vs {path:?}");
    }
}

/// moby/patternmatcher `TestMatches`: (pattern, text, matched-with-parents).
#[test]
fn patternmatcher_table() {
    #[rustfmt::skip]
    let single: &[(&str, &str, bool)] = &[
        ("**", "file", true), ("**", "file/", true), ("**/", "file", true),
        ("**/", "file/", true), ("**", "/", true), ("**/", "/", true),
        ("**", "dir/file", true), ("**/", "dir/file", true), ("**", "dir/file/", true),
        ("**/", "dir/file/", true), ("**/**", "dir/file", true), ("**/**", "dir/file/", true),
        ("dir/**", "dir/file", true), ("dir/**", "dir/file/", true),
        ("dir/**", "dir/dir2/file", true), ("dir/**", "dir/dir2/file/", true),
        ("**/dir", "dir", true), ("**/dir", "dir/file", true),
        ("**/dir2/*", "dir/dir2/file", true), ("**/dir2/*", "dir/dir2/file/", true),
        ("**/dir2/**", "dir/dir2/dir3/file", true), ("**/dir2/**", "dir/dir2/dir3/file/", true),
        ("**file", "file", true), ("**file", "dir/file", true), ("**/file", "dir/file", true),
        ("**file", "dir/dir/file", true), ("**/file", "dir/dir/file", true),
        ("**/file*", "dir/dir/file", true), ("**/file*", "dir/dir/file.txt", true),
        ("**/file*txt", "dir/dir/file.txt", true), ("**/file*.txt", "dir/dir/file.txt", true),
        ("**/file*.txt*", "dir/dir/file.txt", true), ("**/**/*.txt", "dir/dir/file.txt", true),
        ("**/**/*.txt2", "dir/dir/file.txt", false), ("**/*.txt", "file.txt", true),
        ("**/**/*.txt", "file.txt", true), ("a**/*.txt", "a/file.txt", true),
        ("a**/*.txt", "a/dir/file.txt", true), ("a**/*.txt", "a/dir/dir/file.txt", true),
        ("a/*.txt", "a/dir/file.txt", false), ("a/*.txt", "a/file.txt", true),
        ("a/*.txt**", "a/file.txt", true), ("a[b-d]e", "ae", false), ("a[b-d]e", "ace", true),
        ("a[b-d]e", "aae", false), ("a[^b-d]e", "aze", true), (".*", ".foo", true),
        (".*", "foo", false), ("abc.def", "abcdef", false), ("abc.def", "abc.def", true),
        ("abc.def", "abcZdef", false), ("abc?def", "abcZdef", true), ("abc?def", "abcdef", false),
        ("**/foo/bar", "foo/bar", true), ("**/foo/bar", "dir/foo/bar", true),
        ("**/foo/bar", "dir/dir2/foo/bar", true), ("abc/**", "abc", false),
        ("abc/**", "abc/def", true), ("abc/**", "abc/def/ghi", true), ("**/.foo", ".foo", true),
        ("**/.foo", "bar.foo", false), ("a(b)c/def", "a(b)c/def", true),
        ("a(b)c/def", "a(b)c/xyz", false), ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
        ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", true),
        (r"a\\", r"a\", true), (r"a\*b", "a*b", true),
    ];
    for (pattern, text, want) in single {
        let m = IgnoreMatcher::new(&[pattern]).unwrap();
        assert_eq!(m.matches(text), *want, "{pattern:?} vs {text:?}");
        assert_eq!(walk_match(&m, text), *want, "walk: {pattern:?} vs {text:?}");
    }
    let multi: &[(&[&str], &str, bool)] = &[
        (&["**", "!util/docker/web"], "util/docker/web/foo", false),
        (
            &["**", "!util/docker/web", "util/docker/web/foo"],
            "util/docker/web/foo",
            true,
        ),
        (
            &["**", "!dist/*.whl"],
            "dist/proxy.py-2.4.0rc3-any.whl",
            false,
        ),
    ];
    for (patterns, text, want) in multi {
        let m = IgnoreMatcher::new(patterns).unwrap();
        assert_eq!(m.matches(text), *want, "{patterns:?} vs {text:?}");
        assert_eq!(
            walk_match(&m, text),
            *want,
            "walk: {patterns:?} vs {text:?}"
        );
    }
}

#[test]
fn walk_matching_keeps_buildkit_quirk() {
    // BuildKit's walker (MatchesUsingParentResults) skips "!d" for d/f because the parent
    // "d" did not need it; MatchesOrParentMatches re-includes. We follow the walker.
    let m = IgnoreMatcher::new(&["d/f", "!d"]).unwrap();
    assert!(!m.matches("d/f"));
    assert!(walk_match(&m, "d/f"));
}

#[test]
fn bad_patterns_are_errors() {
    for bad in [
        "!", "[", "a[", "[^bc", "[]a]", "[x-]", "\\", "a/b[", "[z-a]",
    ] {
        let err = IgnoreMatcher::new(&[bad]).unwrap_err();
        assert!(
            matches!(err, ContextError::BadPattern { .. }),
            "{bad:?}: {err}"
        );
    }
}

/// Go's `filepath.Match` tests (path/filepath/match_test.go).
#[test]
fn go_filepath_match_table() {
    #[rustfmt::skip]
    let table: &[(&str, &str, Option<bool>)] = &[
        ("abc", "abc", Some(true)), ("*", "abc", Some(true)), ("*c", "abc", Some(true)),
        ("a*", "a", Some(true)), ("a*", "abc", Some(true)), ("a*", "ab/c", Some(false)),
        ("a*/b", "abc/b", Some(true)), ("a*/b", "a/c/b", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)), ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
        ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)), ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
        ("ab[c]", "abc", Some(true)), ("ab[b-d]", "abc", Some(true)), ("ab[e-g]", "abc", Some(false)),
        ("ab[^c]", "abc", Some(false)), ("ab[^b-d]", "abc", Some(false)),
        ("ab[^e-g]", "abc", Some(true)), ("a\\*b", "a*b", Some(true)), ("a\\*b", "ab", Some(false)),
        ("a?b", "a☺b", Some(true)), ("a[^a]b", "a☺b", Some(true)), ("a???b", "a☺b", Some(false)),
        ("a[^a][^a][^a]b", "a☺b", Some(false)), ("[a-ζ]*", "α", Some(true)),
        ("*[a-ζ]", "A", Some(false)), ("a?b", "a/b", Some(false)), ("a*b", "a/b", Some(false)),
        ("[\\]a]", "]", Some(true)), ("[\\-]", "-", Some(true)), ("[x\\-]", "x", Some(true)),
        ("[x\\-]", "-", Some(true)), ("[x\\-]", "z", Some(false)), ("[\\-x]", "x", Some(true)),
        ("[\\-x]", "-", Some(true)), ("[\\-x]", "a", Some(false)), ("[]a]", "]", None),
        ("[-]", "-", None), ("[x-]", "x", None), ("[x-]", "-", None), ("[x-]", "z", None),
        ("[-x]", "x", None), ("[-x]", "-", None), ("[-x]", "a", None), ("\\", "a", None),
        ("[a-b-c]", "a", None), ("[", "a", None), ("[^", "a", None), ("[^bc", "a", None),
        ("a[", "a", None), ("a[", "ab", None), ("a[", "x", None), ("a/b[", "x", None),
        ("*x", "xxx", Some(true)),
    ];
    for (pattern, name, want) in table {
        let got = path_match(pattern, name).ok();
        assert_eq!(got, *want, "Match({pattern:?}, {name:?})");
    }
}

#[test]
fn clean_and_parse() {
    for (input, want) in [
        ("", "."),
        ("a/./b/../c", "a/c"),
        ("../../x", "../../x"),
        ("/../x", "/x"),
        ("a/..", "."),
        ("//a//b//", "/a/b"),
        ("/", "/"),
    ] {
        assert_eq!(clean_path(input), want, "{input:?}");
    }
    let parsed = parse_dockerignore("#c\n/foo/\n!/bar\n  !  ./baz/../qux \n/\n!\n");
    assert_eq!(parsed, ["foo", "!bar", "!qux", "/", "!"]);
}

#[test]
fn ignore_file_selection() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    assert!(read_ignore_patterns(ctx, None).unwrap().is_empty());
    std::fs::write(ctx.join(".dockerignore"), "generic\n").unwrap();
    assert_eq!(read_ignore_patterns(ctx, None).unwrap(), ["generic"]);
    std::fs::write(ctx.join("Dockerfile.dockerignore"), "default-specific\n").unwrap();
    assert_eq!(
        read_ignore_patterns(ctx, None).unwrap(),
        ["default-specific"]
    );
    std::fs::create_dir(ctx.join("build")).unwrap();
    let df = ctx.join("build/app.Dockerfile");
    assert_eq!(read_ignore_patterns(ctx, Some(&df)).unwrap(), ["generic"]);
    std::fs::write(ctx.join("build/app.Dockerfile.dockerignore"), "app\n").unwrap();
    assert_eq!(read_ignore_patterns(ctx, Some(&df)).unwrap(), ["app"]);
    std::fs::create_dir(ctx.join("other.dockerignore")).unwrap();
    let err = read_ignore_patterns(ctx, Some(&ctx.join("other"))).unwrap_err();
    assert!(
        matches!(err, ContextError::Io { ref path, .. } if path.ends_with("other.dockerignore"))
    );
}

#[test]
fn descend_decision() {
    let m = matcher("node_modules\n!node_modules/keep/*\nvendor");
    assert!(m.should_descend_excluded("node_modules"));
    assert!(m.should_descend_excluded("node_modules/keep"));
    assert!(!m.should_descend_excluded("node_modules/other"));
    assert!(!m.should_descend_excluded("vendor"));
    assert!(!matcher("vendor").should_descend_excluded("vendor"));
    assert!(matcher("vendor\n!**/*.go").should_descend_excluded("vendor"));
}

fn segment() -> impl Strategy<Value = String> {
    // literal characters only, including regex metacharacters that must stay literal
    "[a-z0-9_.+(){}$|-]{1,6}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn literal_path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 1..4).prop_map(|v| v.join("/"))
}

proptest! {
    #[test]
    fn literal_pattern_matches_itself_and_descendants(p in literal_path(), child in literal_path()) {
        for spelled in [p.clone(), format!("/{p}"), format!("{p}/"), format!("./{p}")] {
            let m = IgnoreMatcher::new(&parse_dockerignore(&spelled)).unwrap();
            let below = format!("{p}/{child}");
            let sibling = format!("{p}x");
            prop_assert!(m.matches(&p));
            prop_assert!(m.matches(&below));
            prop_assert!(walk_match(&m, &below));
            prop_assert!(!m.matches(&sibling));
            prop_assert!(path_match(&p, &p).unwrap());
        }
    }

    #[test]
    fn exception_after_pattern_reincludes(p in literal_path(), child in literal_path()) {
        let below = format!("{p}/{child}");
        let negated = format!("!{p}");
        let m = IgnoreMatcher::new(&[p.clone(), negated.clone()]).unwrap();
        prop_assert!(!m.matches(&p));
        prop_assert!(!walk_match(&m, &below));
        let m = IgnoreMatcher::new(&[negated, p.clone()]).unwrap();
        prop_assert!(m.matches(&p));
        prop_assert!(walk_match(&m, &below));
    }

    #[test]
    fn last_matching_pattern_wins(
        rules in prop::collection::vec((any::<bool>(), 0usize..6), 0..8),
        target in 0usize..6,
    ) {
        let universe = ["a", "a/b", "a/b/c", "a/d", "e", "e/a"];
        let patterns: Vec<String> = rules
            .iter()
            .map(|(neg, i)| format!("{}{}", if *neg { "!" } else { "" }, universe[*i]))
            .collect();
        let m = IgnoreMatcher::new(&patterns).unwrap();
        let path = universe[target];
        let expected = rules
            .iter()
            .rev()
            .find(|(_, i)| {
                let p = universe[*i];
                path == p || path.starts_with(&format!("{p}/"))
            })
            .is_some_and(|(neg, _)| !neg);
        prop_assert_eq!(m.matches(path), expected, "{:?} vs {}", patterns, path);
    }
}
