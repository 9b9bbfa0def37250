//! Focused tests for the BuildKit-compatible Dockerfile parser and its dump.

use model::frontend::dump::{dump, dump_node, go_quote};
use model::frontend::parser::{parse, parse_heredoc, Dockerfile, Node, ParseError};

fn ok(src: &str) -> Dockerfile {
    parse(src.as_bytes()).unwrap_or_else(|e| panic!("{src:?} failed: {e}"))
}

fn fail(src: &[u8]) -> ParseError {
    match parse(src) {
        Ok(df) => panic!("{src:?} parsed:\n{}", dump(&df)),
        Err(e) => e,
    }
}

fn dumped(src: &str) -> String {
    dump(&ok(src))
}

fn lines(df: &Dockerfile) -> Vec<(usize, usize)> {
    df.nodes
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Heredocs

#[test]
fn heredoc_body_is_collected() {
    let df = ok("FROM alpine\nRUN <<EOF\necho hello\necho world\nEOF\nRUN ls\n");
    assert_eq!(df.nodes.len(), 3);
    let run = &df.nodes[1];
    assert_eq!(dump_node(run), r#"run "<<EOF""#);
    assert_eq!(run.heredocs.len(), 1);
    let h = &run.heredocs[0];
    assert_eq!(h.name, "EOF");
    assert_eq!(h.content, "echo hello\necho world\n");
    assert_eq!(h.raw_content, b"echo hello\necho world\n");
    assert!(h.expand);
    assert!(!h.chomp);
    assert_eq!(h.fd, None);
    assert_eq!(lines(&df), vec![(1, 1), (2, 5), (6, 6)]);
    assert_eq!(dump_node(&df.nodes[2]), r#"run "ls""#);
}

#[test]
fn heredoc_body_is_verbatim() {
    let df = ok("RUN <<EOF\n# not a comment\n\n  indented \\\nEOF\n");
    assert_eq!(df.nodes.len(), 1);
    assert_eq!(
        df.nodes[0].heredocs[0].content,
        "# not a comment\n\n  indented \\\n"
    );
}

#[test]
fn heredoc_empty_body() {
    let df = ok("RUN <<EMPTY\nEMPTY\n");
    assert_eq!(df.nodes[0].heredocs[0].content, "");
    assert_eq!(lines(&df), vec![(1, 2)]);
}

#[test]
fn heredoc_chomp_strips_leading_tabs() {
    let df = ok("RUN <<-EOT\n\techo a\n\t\techo b\n  spaces stay\n\tEOT\nRUN x\n");
    let h = &df.nodes[0].heredocs[0];
    assert!(h.chomp);
    assert_eq!(h.name, "EOT");
    assert_eq!(h.content, "echo a\necho b\n  spaces stay\n");
    assert_eq!(h.raw_content, b"\techo a\n\t\techo b\n  spaces stay\n");
    assert_eq!(lines(&df), vec![(1, 5), (6, 6)]);
}

#[test]
fn heredoc_without_chomp_needs_exact_terminator() {
    // Without `-` a tab-indented terminator is body text, so the heredoc never ends.
    let e = fail(b"RUN <<EOT\n\techo\n\tEOT\n");
    assert_eq!(e.line, 1);
    assert!(e.message.contains("EOT"), "{e}");
}

#[test]
fn heredoc_quoted_delimiter_disables_expansion() {
    for (src, name, expand) in [
        ("RUN <<'EOF'\nx\nEOF\n", "EOF", false),
        ("RUN <<\"EOF\"\nx\nEOF\n", "EOF", false),
        ("RUN <<E\"O\"F\nx\nEOF\n", "EOF", false),
        ("RUN <<-'EOF'\nx\n\tEOF\n", "EOF", false),
        ("RUN <<EOF\nx\nEOF\n", "EOF", true),
        ("RUN <<eo\\'f\nx\neo'f\n", "eo'f", true),
        ("RUN <<'e'o\\'f\nx\neo'f\n", "eo'f", false),
        ("RUN <<'one two'\nx\none two\n", "one two", false),
        ("RUN <<$EOF\nx\n$EOF\n", "$EOF", true),
        ("RUN <<  EOF\nx\nEOF\n", "EOF", true),
        ("COPY <<file.txt /dest\nx\nfile.txt\n", "file.txt", true),
    ] {
        let df = ok(src);
        assert_eq!(df.nodes.len(), 1, "{src:?}");
        let h = &df.nodes[0].heredocs[0];
        assert_eq!((h.name.as_str(), h.expand), (name, expand), "{src:?}");
        assert_eq!(h.content, "x\n", "{src:?}");
    }
}

#[test]
fn several_heredocs_on_one_line() {
    let df = ok("COPY <<X <<Y /dest\nY\nX\nX\nY\nRUN done\n");
    let copy = &df.nodes[0];
    assert_eq!(dump_node(copy), r#"copy "<<X" "<<Y" "/dest""#);
    let docs: Vec<(&str, &str)> = copy
        .heredocs
        .iter()
        .map(|h| (h.name.as_str(), h.content.as_str()))
        .collect();
    assert_eq!(docs, vec![("X", "Y\n"), ("Y", "X\n")]);
    assert_eq!(lines(&df), vec![(1, 5), (6, 6)]);
}

#[test]
fn heredoc_with_flags_and_file_descriptor() {
    let df = ok("RUN --mount=type=cache,target=/c 3<<EOF python3\nprint(1)\nEOF\n");
    let n = &df.nodes[0];
    assert_eq!(n.flags, vec!["--mount=type=cache,target=/c"]);
    assert_eq!(n.args, vec!["3<<EOF python3"]);
    assert_eq!(n.heredocs[0].fd, Some(3));
    assert_eq!(n.heredocs[0].content, "print(1)\n");
}

#[test]
fn heredoc_missing_terminator_is_an_error() {
    let e = fail(b"FROM a\nRUN <<EOF\necho hi\n");
    assert_eq!(e.line, 2);
    assert_eq!(e.message, "heredoc EOF has no terminator");
    // The second heredoc of a line is missing its terminator.
    let e = fail(b"FROM a\n\nCOPY <<A <<B /x\na\nA\nb\n");
    assert_eq!(e.line, 3);
    assert!(e.message.contains('B'), "{e}");
}

#[test]
fn heredoc_only_for_run_copy_add() {
    // USER <<X is no heredoc: the following `X` is an instruction of its own.
    assert_eq!(dumped("USER <<X\nX\n"), "(user \"<<X\")\n(x \"\")\n");
    assert_eq!(
        dumped("ENV A=<<X\nX\n"),
        "(env \"A\" \"<<X\" \"=\")\n(x \"\")\n"
    );
    let df = ok("ADD <<EOF /a\nbody\nEOF\n");
    assert_eq!(df.nodes[0].heredocs[0].content, "body\n");
}

#[test]
fn heredoc_not_in_json_or_quoted_form() {
    let df =
        ok("RUN [\"<<EOF\"]\nEOF\nRUN \"<<NOHEREDOC\"\nRUN '<<EOF'\nCOPY [\"<<EOF\", \"/x\"]\n");
    assert!(df.nodes.iter().all(|n| n.heredocs.is_empty()));
    assert_eq!(
        dump(&df),
        "(run \"<<EOF\")\n(eof \"\")\n(run \"\\\"<<NOHEREDOC\\\"\")\n(run \"'<<EOF'\")\n(copy \"<<EOF\" \"/x\")\n"
    );
    assert!(df.nodes[0].json);
}

#[test]
fn heredoc_ignored_when_line_does_not_lex() {
    // An unterminated quote makes BuildKit's lexer fail; the line then has no heredocs.
    let df = ok("RUN <<EOF echo \"oops\nEOF\n");
    assert!(df.nodes[0].heredocs.is_empty());
    assert_eq!(df.nodes[1].keyword, "eof");
}

#[test]
fn heredoc_line_with_variables() {
    let df = ok("RUN echo ${A:-a b} $\u{e9}1 \"$B\" <<EOF\nx\nEOF\n");
    assert_eq!(df.nodes.len(), 1);
    assert_eq!(df.nodes[0].heredocs[0].content, "x\n");
    // A broken `${` makes the line unlexable, so there is no heredoc.
    let df = ok("RUN echo ${ <<EOF\nEOF\n");
    assert_eq!(dump(&df), "(run \"echo ${ <<EOF\")\n(eof \"\")\n");
}

#[test]
fn heredoc_in_onbuild() {
    let df = ok("ONBUILD RUN <<EOF\necho hi\nEOF\nONBUILD RUN [\"<<EOF\"]\n");
    assert_eq!(dump_node(&df.nodes[0]), r#"onbuild (run "<<EOF")"#);
    assert_eq!(df.nodes[0].heredocs[0].content, "echo hi\n");
    assert!(df.nodes[1].heredocs.is_empty());
    assert_eq!(lines(&df), vec![(1, 3), (4, 4)]);
}

#[test]
fn heredoc_with_crlf_and_continuation() {
    let df = ok("RUN <<EOF \\\r\n  cat\r\necho hi\r\nEOF\r\n");
    let n = &df.nodes[0];
    assert_eq!(n.args, vec!["<<EOF   cat"]);
    assert_eq!(n.heredocs[0].content, "echo hi\r\n");
    assert_eq!(lines(&df), vec![(1, 4)]);
}

#[test]
fn parse_heredoc_words() {
    for w in [
        "<<EOF",
        "<<'EOF'",
        "<<\"EOF\"",
        "<<-EOF",
        "<<-'EOF'",
        "<<EO\"F\"",
        "<< EOF",
    ] {
        let h = parse_heredoc(w).unwrap().unwrap_or_else(|| panic!("{w}"));
        assert_eq!(h.name, "EOF", "{w}");
    }
    for w in [
        "", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "<<EOF sh", "a<<EOF",
    ] {
        assert_eq!(parse_heredoc(w).unwrap(), None, "{w}");
    }
    for w in ["<<'EOF", "<<\"EOF", "<<EOF'", "<<EOF\""] {
        assert!(parse_heredoc(w).is_err(), "{w}");
    }
    let h = parse_heredoc("12<<-X").unwrap().unwrap();
    assert_eq!((h.fd, h.chomp, h.name.as_str()), (Some(12), true, "X"));
}

// ---------------------------------------------------------------------------------------
// Directives

#[test]
fn directives_are_read() {
    let df = ok(
        "# syntax=docker/dockerfile:1\n#ESCAPE = `\n# check=skip=all;error=true\n\nFROM a `\n  b\n",
    );
    assert_eq!(df.directives.syntax.as_deref(), Some("docker/dockerfile:1"));
    assert_eq!(df.directives.escape, '`');
    assert_eq!(df.directives.check.as_deref(), Some("skip=all;error=true"));
    assert_eq!(dump(&df), "(from \"a\" \"b\")\n");
    assert_eq!(lines(&df), vec![(5, 6)]);
}

#[test]
fn default_directives() {
    let df = ok("FROM a\n");
    assert_eq!(df.directives.syntax, None);
    assert_eq!(df.directives.escape, '\\');
    assert_eq!(df.directives.check, None);
}

#[test]
fn directive_section_ends_at_first_other_line() {
    for src in [
        "# comment\n# escape=`\nFROM a\n",
        "\n# escape=`\nFROM a\n",
        "# unknown=1\n# escape=`\nFROM a\n",
        "# escape=\nFROM a\n",
        "FROM a\n# escape=`\n",
    ] {
        assert_eq!(ok(src).directives.escape, '\\', "{src:?}");
    }
    assert_eq!(ok("   # escape = `  \nFROM a\n").directives.escape, '`');
}

#[test]
fn repeated_directive_is_an_error() {
    let e = fail(b"# escape=\\\n# escape=`\nFROM a\n");
    assert_eq!(e.line, 2);
    assert_eq!(e.message, "only one escape parser directive can be used");
    let e = fail(b"# syntax=a\n# SYNTAX=b\nFROM a\n");
    assert_eq!(e.line, 2);
    // Not a repeat once the directive section has ended.
    assert_eq!(
        ok("# syntax=a\nFROM x\n# syntax=b\n")
            .directives
            .syntax
            .as_deref(),
        Some("a")
    );
}

#[test]
fn bad_escape_is_an_error() {
    let e = fail(b"# escape=x\nFROM a\n");
    assert_eq!(e.line, 1);
    assert_eq!(
        e.message,
        "unknown escape directive value 'x': must be \\ or `"
    );
    assert!(fail(b"# escape=``\nFROM a\n").message.contains("'``'"));
    // Trailing blanks are not part of the value, but a value of only blanks is.
    assert!(fail(b"# escape= \nFROM a\n").message.contains("' '"));
}

#[test]
fn backtick_escape_changes_continuation_and_words() {
    let src = "# escape=`\nFROM a\nRUN dir c:\\ `\n  && echo\nENV A=x`\"y B=\"a`\"b\" \nCOPY --from=x\\y a b\nRUN echo \\\n";
    assert_eq!(
        dumped(src),
        concat!(
            "(from \"a\")\n",
            "(run \"dir c:\\\\   && echo\")\n",
            "(env \"A\" \"x`\\\"y\" \"=\" \"B\" \"\\\"a`\\\"b\\\"\" \"=\")\n",
            "(copy [\"--from=xy\"] \"a\" \"b\")\n",
            "(run \"echo \\\\\")\n",
        )
    );
}

// ---------------------------------------------------------------------------------------
// Physical lines: BOM, CRLF, continuation, comments, long lines

#[test]
fn bom_is_dropped_from_the_first_line_only() {
    let df = parse(b"\xEF\xBB\xBF# escape=`\nFROM a `\n  b\n").unwrap();
    assert_eq!(df.directives.escape, '`');
    assert_eq!(dump(&df), "(from \"a\"   \"b\")\n".replace("   ", " "));
    let df = parse(b"\xEF\xBB\xBFFROM a\n").unwrap();
    assert_eq!(df.nodes[0].keyword, "from");
}

#[test]
fn crlf_line_endings() {
    let df = parse(b"FROM a\r\n\r\nRUN echo \\\r\n  b\r\n# c\r\nCMD [\"x\"]\r\n").unwrap();
    assert_eq!(dump(&df), "(from \"a\")\n(run \"echo   b\")\n(cmd \"x\")\n");
    assert_eq!(lines(&df), vec![(1, 1), (3, 4), (6, 6)]);
    assert_eq!(df.nodes[1].original, "RUN echo   b");
}

#[test]
fn continuation_rules() {
    assert_eq!(
        dumped("RUN a \\  \n b\\\n\n  # comment\n c \\\\\nRUN d\\\n"),
        "(run \"a  b c \\\\\\\\\")\n(run \"d\")\n"
    );
    // A lone escape char on a line continues too; a comment neither ends nor joins.
    assert_eq!(
        dumped("ENV E hello\\\n\\\nworld\n"),
        "(env \"E\" \"helloworld\" \"\")\n"
    );
}

#[test]
fn empty_continuation_line_warns() {
    let df = ok("FROM a\nRUN a \\\n\n  b\nRUN c \\\n# x\n d\n");
    assert_eq!(dump(&df), "(from \"a\")\n(run \"a   b\")\n(run \"c  d\")\n");
    assert_eq!(df.warnings.len(), 1);
    assert_eq!(df.warnings[0].line, 4);
    assert!(df.warnings[0].message.contains("RUN a   b"));
}

#[test]
fn line_ranges() {
    let src =
        "# escape=\\\n\nFROM a\n\n# c\nRUN a \\\n\n# inside\n  b \\\n  c\nENV X=1\n\nCMD x \\";
    let df = ok(src);
    assert_eq!(lines(&df), vec![(3, 3), (6, 10), (11, 11), (13, 13)]);
    assert_eq!(dump_node(&df.nodes[3]), r#"cmd "x""#);
}

#[test]
fn long_lines() {
    let max = format!("FROM a\nLABEL a={}\n", "b".repeat(65535 - 8));
    assert_eq!(ok(&max).nodes.len(), 2);
    let too_long = format!("FROM a\nLABEL a={}\n", "b".repeat(65535 - 7));
    let e = fail(too_long.as_bytes());
    assert_eq!(e.line, 2);
    assert_eq!(
        e.message,
        "dockerfile line greater than max allowed size of 65535"
    );
    // Also without a final newline, and in a heredoc body.
    assert!(parse(format!("FROM {}", "a".repeat(65530)).as_bytes()).is_ok());
    assert!(parse(format!("FROM {}", "a".repeat(65531)).as_bytes()).is_err());
    let body = format!("RUN <<EOF\n{}\nEOF\n", "x".repeat(70000));
    assert_eq!(fail(body.as_bytes()).line, 2);
}

#[test]
fn files_without_instructions() {
    for src in [
        &b""[..],
        b"\n\n",
        b"# a\n# b\n",
        b"# escape=`\n",
        b"   \t\n",
    ] {
        let e = fail(src);
        assert_eq!(e.message, "file with no instructions");
        assert_eq!(e.line, 1);
    }
}

// ---------------------------------------------------------------------------------------
// Instructions

#[test]
fn onbuild() {
    let df = ok("ONBUILD RUN echo hi\nONBUILD\nonbuild --x COPY --from=a [\"a\", \"b\"]\n");
    assert_eq!(
        dump(&df),
        "(onbuild (run \"echo hi\"))\n(onbuild)\n(onbuild [\"--x\"] (copy [\"--from=a\"] \"a\" \"b\"))\n"
    );
    let inner = df.nodes[2].next.as_deref().unwrap();
    assert_eq!(inner.keyword, "copy");
    assert!(inner.json);
    assert!(!df.nodes[2].json);
    assert_eq!(inner.original, "COPY --from=a [\"a\", \"b\"]");
    assert_eq!((inner.start_line, inner.end_line), (3, 3));
    assert!(df.nodes[1].next.is_none());
}

#[test]
fn json_flag_and_exec_form() {
    let df = ok("CMD [\"a\", \"b\"]\nCMD a b\nCMD []\nENTRYPOINT [ ]\nSHELL [\"sh\", \"-c\"]\nVOLUME [\"/v\"]\nVOLUME /v\nHEALTHCHECK CMD [\"x\"]\nHEALTHCHECK CMD x\nRUN ['a']\nRUN [\"a\"] b\n");
    let flags: Vec<bool> = df.nodes.iter().map(|n| n.json).collect();
    assert_eq!(
        flags,
        vec![true, false, true, true, true, true, false, true, false, false, false]
    );
    assert_eq!(
        dump(&df),
        concat!(
            "(cmd \"a\" \"b\")\n(cmd \"a b\")\n(cmd)\n(entrypoint)\n(shell \"sh\" \"-c\")\n",
            "(volume \"/v\")\n(volume \"/v\")\n(healthcheck \"CMD\" \"x\")\n(healthcheck \"CMD\" \"x\")\n",
            "(run \"['a']\")\n(run \"[\\\"a\\\"] b\")\n",
        )
    );
}

#[test]
fn json_strings_follow_go_rules() {
    let df = ok(r#"CMD ["\u00e9", "\ud83d\ude00", "\ud800x", "\/", "a\u0000"]"#);
    assert_eq!(df.nodes[0].args, vec!["é", "😀", "\u{fffd}x", "/", "a\0"]);
    assert_eq!(
        dump_node(&df.nodes[0]),
        "cmd \"é\" \"😀\" \"\u{fffd}x\" \"/\" \"a\\x00\""
    );
    // Invalid JSON (bad escape, trailing comma, overflowing number) is shell form.
    for src in [
        r#"CMD ["\x"]"#,
        r#"CMD ["a",]"#,
        "CMD [1e999]",
        "CMD [\"a\"\t\"b\"]",
    ] {
        let df = ok(src);
        assert!(!df.nodes[0].json, "{src}");
        assert_eq!(df.nodes[0].args.len(), 1, "{src}");
    }
}

#[test]
fn json_with_non_strings_is_an_error() {
    for src in [
        "FROM a\nCMD [ \"echo\", [ \"nested json\" ] ]\n",
        "FROM a\nRUN [1]\n",
        "FROM a\nCOPY [\"a\", null]\n",
        "FROM a\nHEALTHCHECK CMD [true]\n",
        "FROM a\nVOLUME [{\"a\": 1}]\n",
        "FROM a\nONBUILD RUN [\"a\", 2]\n",
    ] {
        let e = fail(src.as_bytes());
        assert_eq!(e.line, 2, "{src}");
        assert!(e.message.contains("strings only"), "{e}");
    }
}

#[test]
fn flags() {
    assert_eq!(
        dumped("FROM --platform=$BUILDPLATFORM golang:1.22 AS build\nCOPY --chown=\"a b\" --x='y' --e=a\\ b -- --not-a-flag /d\nRUN --\nFOO --bar baz\n"),
        concat!(
            "(from [\"--platform=$BUILDPLATFORM\"] \"golang:1.22\" \"AS\" \"build\")\n",
            "(copy [\"--chown=a b\" \"--x=y\" \"--e=a b\"] \"--not-a-flag\" \"/d\")\n",
            "(run)\n",
            "(foo [\"--bar\"] \"\")\n",
        )
    );
    // BuildKit reads flags byte by byte: non-ASCII bytes become Latin-1 code points.
    assert_eq!(ok("COPY --a=é b c\n").nodes[0].flags, vec!["--a=Ã©"]);
}

#[test]
fn env_label_arg() {
    assert_eq!(
        dumped("ENV A B C\nENV A=\"b c\" D=e\\ f\nLABEL \"k\"='v' x=\nARG a=\"1 2\" b\nARG\nENV\n"),
        concat!(
            "(env \"A\" \"B C\" \"\")\n",
            "(env \"A\" \"\\\"b c\\\"\" \"=\" \"D\" \"e\\\\ f\" \"=\")\n",
            "(label \"\\\"k\\\"\" \"'v'\" \"=\" \"x\" \"\" \"=\")\n",
            "(arg \"a=\\\"1 2\\\"\" \"b\")\n",
            "(arg)\n",
            "(env)\n",
        )
    );
}

#[test]
fn env_errors() {
    let e = fail(b"FROM busybox\n\nENV PATH\n");
    assert_eq!(
        (e.line, e.message.as_str()),
        (3, "ENV must have two arguments")
    );
    assert_eq!(fail(b"LABEL a\n").message, "LABEL must have two arguments");
    let e = fail(b"ENV a=b c\n");
    assert!(e.message.contains("can't find = in \"c\""), "{e}");
}

#[test]
fn other_instructions() {
    assert_eq!(
        dumped("FROM\tA  as  b\nEXPOSE 80/tcp\t443\nUSER  a b \nWORKDIR /x y\nSTOPSIGNAL SIGKILL\nMAINTAINER me <m@x>\nHealthCheck NONE\nHEALTHCHECK\nUNKNOWN x y\nunknown\n"),
        concat!(
            "(from \"A\" \"as\" \"b\")\n(expose \"80/tcp\" \"443\")\n(user \"a b\")\n(workdir \"/x y\")\n",
            "(stopsignal \"SIGKILL\")\n(maintainer \"me <m@x>\")\n(healthcheck \"NONE\")\n(healthcheck)\n",
            "(unknown \"\")\n(unknown \"\")\n",
        )
    );
}

#[test]
fn node_fields() {
    let df = ok("\n  COPY  --from=b  x \\\n   y  \n");
    let n: &Node = &df.nodes[0];
    assert_eq!(n.keyword, "copy");
    assert_eq!(n.flags, vec!["--from=b"]);
    assert_eq!(n.args, vec!["x", "y"]);
    assert_eq!(n.original, "COPY  --from=b  x    y  ");
    assert_eq!((n.start_line, n.end_line), (2, 3));
}

// ---------------------------------------------------------------------------------------
// Dump and quoting

#[test]
fn go_quote_matches_strconv_quote() {
    assert_eq!(go_quote(b"plain"), r#""plain""#);
    assert_eq!(go_quote(b"\" \\ /"), r#""\" \\ /""#);
    assert_eq!(
        go_quote(b"\x07\x08\x0c\n\r\t\x0b\x00\x1f\x7f"),
        r#""\a\b\f\n\r\t\v\x00\x1f\x7f""#
    );
    assert_eq!(go_quote("♥ ☃ é 😀".as_bytes()), "\"♥ ☃ é 😀\"");
    assert_eq!(
        go_quote("\u{a0}\u{ad}\u{200b}\u{feff}\u{e000}\u{3000}".as_bytes()),
        r#""\u00a0\u00ad\u200b\ufeff\ue000\u3000""#
    );
    assert_eq!(
        go_quote("\u{10ffff}\u{f0000}".as_bytes()),
        r#""\U0010ffff\U000f0000""#
    );
    assert_eq!(go_quote(b"a\xffb\xc3"), r#""a\xffb\xc3""#);
    assert_eq!(go_quote(b"\xf0\x9f\x98"), r#""\xf0\x9f\x98""#);
    assert_eq!(go_quote("\u{fffd}".as_bytes()), "\"\u{fffd}\"");
}

#[test]
fn invalid_utf8_is_kept_in_args() {
    let df = parse(b"RUN echo \xff\xfe\nLABEL k \xc3(\n").unwrap();
    assert_eq!(
        dump(&df),
        "(run \"echo \\xff\\xfe\")\n(label \"k\" \"\\xc3(\" \"\")\n"
    );
    assert_eq!(df.nodes[0].raw_args, vec![b"echo \xff\xfe".to_vec()]);
    assert_eq!(df.nodes[0].args, vec!["echo \u{fffd}\u{fffd}"]);
    // Name=value words are decoded rune by rune, as BuildKit does.
    assert_eq!(
        dump(&parse(b"ENV a=\xff\n").unwrap()),
        "(env \"a\" \"\u{fffd}\" \"=\")\n"
    );
}

#[test]
fn dump_uses_edited_args() {
    let mut df = ok("RUN a\n");
    df.nodes[0].args[0] = "b\tc".into();
    assert_eq!(dump(&df), "(run \"b\\tc\")\n");
}

// ---------------------------------------------------------------------------------------
// Robustness

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const PIECES: &[&[u8]] = &[
        b"RUN ",
        b"COPY ",
        b"ADD ",
        b"ENV ",
        b"LABEL ",
        b"ARG ",
        b"FROM ",
        b"CMD ",
        b"ONBUILD ",
        b"HEALTHCHECK ",
        b"USER ",
        b"x",
        b"a=b",
        b"=",
        b" ",
        b"\t",
        b"\n",
        b"\r\n",
        b"\\",
        b"\\\n",
        b"`",
        b"`\n",
        b"# escape=`\n",
        b"# syntax=x\n",
        b"#",
        b"\"",
        b"'",
        b"[",
        b"]",
        b"[\"a\", ",
        b"1",
        b"{",
        b"}",
        b"$",
        b"${a:-b}",
        b"<<EOF",
        b"<<-EOF",
        b"<<'EOF'",
        b"<< ",
        b"EOF",
        b"\tEOF",
        b"--",
        b"--flag=",
        b"\xff",
        b"\xc2\xa0",
        b"\xc3",
        b"\xef\xbb\xbf",
        b"\\u00e9",
        b"\\ud800",
        b"NONE",
        "$\u{e9}\u{663}x <<\u{e9}".as_bytes(),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn parse_never_panics(idx in proptest::collection::vec(0..PIECES.len(), 0..40)) {
            let src: Vec<u8> = idx.iter().flat_map(|&i| PIECES[i].iter().copied()).collect();
            if let Ok(df) = parse(&src) {
                let out = dump(&df);
                prop_assert_eq!(out.lines().count(), df.nodes.len());
                for n in &df.nodes {
                    prop_assert!(n.start_line >= 1 && n.start_line <= n.end_line);
                    prop_assert_eq!(n.args.len(), n.raw_args.len());
                }
                prop_assert!(df.nodes.windows(2).all(|w| w[0].end_line < w[1].start_line));
            }
        }
    }
}
