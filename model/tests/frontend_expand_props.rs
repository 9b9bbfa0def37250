//! Property tests for the shell-word expander.
use std::collections::BTreeMap;

use model::frontend::expand::Lexer;
use proptest::prelude::*;

fn vars(name: &str, value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(name.to_string(), value.to_string())])
}

proptest! {
    /// Text with no `$`, quotes or escape characters is left exactly as it is.
    #[test]
    fn plain_text_is_unchanged(s in "[a-zA-Z0-9 ./:_=,@+-]{0,40}") {
        let e = Lexer::default().expand(&s, &vars("A", "x")).unwrap();
        prop_assert_eq!(e.value, s);
        prop_assert!(e.matched.is_empty() && e.unmatched.is_empty());
    }

    /// Single quotes keep everything literal, `$` and backslashes included.
    #[test]
    fn single_quotes_are_literal(s in "[^']{0,40}") {
        let e = Lexer::default().expand(&format!("'{s}'"), &vars("A", "x")).unwrap();
        prop_assert_eq!(e.value, s);
    }

    /// `$V`, `${V}` and `"$V"` give the value; the modifiers follow POSIX.
    #[test]
    fn references_and_modifiers(name in "[A-Z_][A-Z0-9_]{0,8}", value in "[a-z0-9 /.]{0,20}", word in "[a-z0-9]{0,8}") {
        let l = Lexer::default();
        let set = vars(&name, &value);
        let unset = BTreeMap::new();
        let ex = |w: String, v: &BTreeMap<String, String>| l.expand(&w, v).unwrap().value;
        prop_assert_eq!(ex(format!("${name}"), &set), value.clone());
        prop_assert_eq!(ex(format!("${{{name}}}"), &set), value.clone());
        prop_assert_eq!(ex(format!("\"${name}\""), &set), value.clone());
        prop_assert_eq!(ex(format!("${{{name}:-{word}}}"), &set), if value.is_empty() { word.clone() } else { value.clone() });
        prop_assert_eq!(ex(format!("${{{name}-{word}}}"), &set), value.clone());
        prop_assert_eq!(ex(format!("${{{name}-{word}}}"), &unset), word.clone());
        prop_assert_eq!(ex(format!("${{{name}:+{word}}}"), &set), if value.is_empty() { String::new() } else { word.clone() });
        prop_assert_eq!(ex(format!("${{{name}+{word}}}"), &set), word.clone());
        prop_assert_eq!(ex(format!("${{{name}+{word}}}"), &unset), String::new());
        prop_assert_eq!(ex(format!("${name}"), &unset), String::new());
    }

    /// An escaped `$` is never a reference.
    #[test]
    fn escaped_dollar_is_literal(name in "[A-Z][A-Z0-9_]{0,8}") {
        let e = Lexer::default().expand(&format!("\\${name}"), &vars(&name, "v")).unwrap();
        prop_assert_eq!(e.value, format!("${name}"));
        prop_assert!(e.matched.is_empty());
    }

    /// With skip_unset, unknown references survive verbatim and expanding them later with
    /// the value gives what one expansion would have given.
    #[test]
    fn skip_unset_then_expand_equals_one_expansion(value in "[a-z0-9/]{1,12}") {
        let keep = Lexer { skip_unset: true, ..Lexer::default() };
        let word = "pre-${LATER}-$KNOWN-${LATER:-d}";
        let first = keep.expand(word, &vars("KNOWN", "k")).unwrap().value;
        let mut all = vars("KNOWN", "k");
        all.insert("LATER".into(), value.clone());
        let once = Lexer::default().expand(word, &all).unwrap().value;
        let twice = Lexer::default().expand(&first, &all).unwrap().value;
        prop_assert_eq!(twice, once);
    }

    /// Expansion never panics, whatever the input.
    #[test]
    fn never_panics(s in "\\PC{0,40}") {
        let _ = Lexer::default().expand(&s, &vars("A", "x"));
        let _ = Lexer::new('`').expand(&s, &vars("A", "x"));
    }
}
