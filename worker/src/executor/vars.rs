//! The variables a stage's instructions see, kept the way BuildKit keeps them.
//!
//! BuildKit holds one environment per stage (the LLB state's env): it starts as the base
//! image's ENV, and both ENV and ARG write into it, the later write winning. Every
//! instruction's words are expanded against it, and RUN gets it as its environment. Only
//! ENV also writes the image config, so after `ENV X=a` then `ARG X` given a value, RUN
//! sees the ARG's value while the image keeps `X=a`; an ENV after the ARG wins again.
//!
//! The coordinator's plan cannot do this exactly: it does not know the base image's ENV,
//! so an ARG default such as `${GOPATH}-x` reaches the task unexpanded. The executor
//! therefore resolves every ARG itself as the stage proceeds (see [`StageVars::track`]).
use std::collections::BTreeMap;

use model::frontend::expand::{Lexer, VarLookup};
use model::frontend::instructions::{ArgDecl, Instruction};
use model::task::StageError;

use super::config::{ImageConfig, DEFAULT_PATH};

/// ARGs BuildKit records but never puts into the environment.
const NON_ENV_ARGS: &[&str] = &["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

/// A stage's environment: image ENV, ENV instructions and ARG values, in write order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageVars {
    /// `(name, value)`; a rewritten name moves to the end, as in the `EnvList` of the
    /// daemon's BuildKit (so `env` inside RUN lists variables in the same order).
    env: Vec<(String, String)>,
}

impl VarLookup for StageVars {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
}

impl StageVars {
    /// The environment a stage starts with: its base image's ENV (PATH always set).
    pub fn from_config(config: &ImageConfig) -> Self {
        let mut vars = StageVars::default();
        for kv in &config.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            vars.set(k, v);
        }
        if vars.get("PATH").is_none() {
            vars.set("PATH", DEFAULT_PATH);
        }
        vars
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// The environment of a RUN, as `NAME=value` strings.
    pub fn to_env(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Expands the words Docker expands in `raw` (ARG defaults excepted: see `track`).
    pub fn expand(&self, raw: &Instruction, escape: char) -> Result<Instruction, StageError> {
        let lexer = Lexer::new(escape);
        let mut ins = raw.clone();
        ins.expand(&mut |w: &str| -> Result<String, StageError> {
            lexer
                .expand(w, self)
                .map(|e| e.value)
                .map_err(|e| StageError::new(e.to_string()))
        })?;
        Ok(ins)
    }

    /// Records what an instruction writes into the environment. `ins` is the instruction
    /// after [`StageVars::expand`]; for an ARG, `planned` is the plan's version of it (its
    /// defaults hold the values of global ARGs a bare `ARG NAME` inherits) and
    /// `build_args` the build's `--build-arg` values.
    ///
    /// An ARG's value, as BuildKit's `dispatchArg` computes it: the `--build-arg` value
    /// if one was given; else its own default expanded against the environment so far;
    /// else the global ARG of that name. An ARG without any value writes nothing.
    pub fn track(
        &mut self,
        ins: &Instruction,
        planned: Option<&Instruction>,
        build_args: &BTreeMap<String, String>,
        escape: char,
    ) -> Result<(), StageError> {
        match ins {
            Instruction::Env(pairs) => {
                for (k, v) in pairs {
                    self.set(k, v);
                }
            }
            Instruction::Arg(decls) => {
                let planned: &[ArgDecl] = match planned {
                    Some(Instruction::Arg(p)) => p,
                    _ => &[],
                };
                let lexer = Lexer::new(escape);
                for d in decls {
                    let value = match (build_args.get(&d.name), &d.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(def)) => Some(
                            lexer
                                .expand(def, &*self)
                                .map_err(|e| StageError::new(e.to_string()))?
                                .value,
                        ),
                        (None, None) => planned
                            .iter()
                            .find(|p| p.name == d.name)
                            .and_then(|p| p.default.clone()),
                    };
                    if let Some(v) = value {
                        if !NON_ENV_ARGS.contains(&d.name.as_str()) {
                            self.set(&d.name, &v);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(name: &str, default: Option<&str>) -> Instruction {
        Instruction::Arg(vec![ArgDecl {
            name: name.into(),
            default: default.map(str::to_string),
        }])
    }

    fn base() -> StageVars {
        StageVars::from_config(&ImageConfig {
            env: vec!["GOPATH=/go".into(), "PATH=/go/bin:/bin".into()],
            ..Default::default()
        })
    }

    #[test]
    fn arg_defaults_read_the_image_env_and_earlier_args() {
        let mut v = base();
        let none = BTreeMap::new();
        v.track(&arg("A", Some("${GOPATH}-x")), None, &none, '\\')
            .unwrap();
        v.track(&arg("B", Some("$A/y")), None, &none, '\\').unwrap();
        assert_eq!(v.get("A"), Some("/go-x"));
        assert_eq!(v.get("B"), Some("/go-x/y"));
    }

    #[test]
    fn last_write_wins_between_env_and_arg() {
        let mut v = base();
        let cli = BTreeMap::from([("S".to_string(), "from-cli".to_string())]);
        let env = Instruction::Env(vec![("S".into(), "from-env".into())]);
        v.track(&env, None, &cli, '\\').unwrap();
        v.track(&arg("S", Some("from-arg")), None, &cli, '\\')
            .unwrap();
        assert_eq!(v.get("S"), Some("from-cli"));
        v.track(&arg("D", Some("${GOPATH}-${S}")), None, &cli, '\\')
            .unwrap();
        assert_eq!(v.get("D"), Some("/go-from-cli"));
        v.track(&env, None, &cli, '\\').unwrap();
        assert_eq!(v.get("S"), Some("from-env"));
        // An ARG given no value at all leaves the environment alone.
        v.track(
            &arg("S", None),
            Some(&arg("S", None)),
            &BTreeMap::new(),
            '\\',
        )
        .unwrap();
        assert_eq!(v.get("S"), Some("from-env"));
        assert_eq!(v.to_env().last().unwrap(), "S=from-env");
    }

    #[test]
    fn a_bare_arg_takes_the_global_value_the_plan_resolved() {
        let mut v = base();
        let planned = arg("G", Some("global"));
        v.track(&arg("G", None), Some(&planned), &BTreeMap::new(), '\\')
            .unwrap();
        assert_eq!(v.get("G"), Some("global"));
    }

    #[test]
    fn path_is_always_set() {
        let v = StageVars::from_config(&ImageConfig::default());
        assert_eq!(v.get("PATH"), Some(DEFAULT_PATH));
    }
}
