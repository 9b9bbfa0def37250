//! Planning one instruction of a stage: its words expanded in the stage's scope, the
//! build args it can see, and what its `--from` (COPY, RUN --mount) reads.
use std::collections::{BTreeMap, BTreeSet};

use super::{at, stage_name_of, PlanError, PlannedInstruction, Scope, StageRef};
use crate::frontend::expand::Lexer;
use crate::frontend::instructions::{parse_instruction, Instruction};
use crate::frontend::parser::Node;

pub(super) struct StageCtx<'a> {
    pub(super) lexer: Lexer,
    pub(super) names: &'a BTreeMap<String, usize>,
    pub(super) stage_nodes: &'a [(&'a Node, Vec<&'a Node>)],
    pub(super) index: usize,
    pub(super) global: &'a Scope,
    pub(super) build_args: &'a BTreeMap<String, String>,
}

impl StageCtx<'_> {
    pub(super) fn plan_instruction(
        &self,
        node: &Node,
        scope: &mut Scope,
        from_onbuild: bool,
    ) -> Result<PlannedInstruction, PlanError> {
        let line = node.start_line;
        let mut instruction = parse_instruction(node).map_err(|e| at(e.line, e.message))?;
        let raw = instruction.clone();
        let args_before = scope.args.clone();
        let mut used: BTreeSet<String> = BTreeSet::new();
        match &mut instruction {
            Instruction::Arg(decls) => {
                for d in decls.iter_mut() {
                    let value = match (self.build_args.get(&d.name), &d.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(def)) => {
                            let e = self
                                .lexer
                                .expand(def, &*scope)
                                .map_err(|e| at(line, e.to_string()))?;
                            used.extend(
                                e.matched.into_iter().filter(|k| scope.args.contains_key(k)),
                            );
                            Some(e.value)
                        }
                        (None, None) => self.global.args.get(&d.name).cloned(),
                    };
                    d.default = value.clone();
                    match value {
                        Some(v) => scope.args.insert(d.name.clone(), v),
                        None => scope.args.remove(&d.name),
                    };
                }
            }
            Instruction::From(_) => unreachable!("FROM starts a stage"),
            other => {
                let lexer = self.lexer;
                let snapshot = scope.clone();
                other.expand(&mut |w: &str| -> Result<String, PlanError> {
                    let e = lexer
                        .expand(w, &snapshot)
                        .map_err(|e| at(line, e.to_string()))?;
                    used.extend(e.matched.into_iter().filter(|k| {
                        !snapshot.env.contains_key(k) && snapshot.args.contains_key(k)
                    }));
                    Ok(e.value)
                })?;
                if let Instruction::Env(pairs) = other {
                    for (k, v) in pairs.iter() {
                        scope.env.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let mut copy_from = None;
        let mut mount_from = Vec::new();
        match &instruction {
            Instruction::Copy(c) => {
                if let Some(f) = &c.from {
                    copy_from = Some(self.resolve_from(f, line, "COPY --from")?);
                }
            }
            Instruction::Run(r) => {
                for m in &r.mounts {
                    mount_from.push(match &m.from {
                        Some(f) => Some(self.resolve_from(f, line, "RUN --mount from")?),
                        None => None,
                    });
                }
            }
            _ => {}
        }
        let build_args = if matches!(instruction, Instruction::Run(_)) {
            scope
                .args
                .iter()
                .filter(|(k, _)| !scope.env.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            used.into_iter()
                .map(|k| {
                    let v = scope.args.get(&k).cloned().unwrap_or_default();
                    (k, v)
                })
                .collect()
        };
        Ok(PlannedInstruction {
            instruction,
            raw,
            args: args_before,
            source: node.original.trim().to_string(),
            start_line: node.start_line,
            end_line: node.end_line,
            copy_from,
            mount_from,
            build_args,
            from_onbuild,
        })
    }

    /// Resolves `--from=<name|index|image>` as BuildKit does: a stage name (any case), an
    /// index counting every stage, or else an external image.
    fn resolve_from(&self, from: &str, line: usize, what: &str) -> Result<StageRef, PlanError> {
        if self.lexer.has_expansion(from) {
            return Err(at(line, format!(
                "{what}={from}: variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround"
            )));
        }
        let lower = from.to_lowercase();
        let current = self.stage_nodes[self.index].0;
        if let Ok(i) = from.parse::<usize>() {
            return if i < self.index {
                Ok(StageRef::Stage(i))
            } else if i == self.index {
                Err(at(line, format!("circular dependency detected on stage: {what}={from} refers to the stage it is in")))
            } else if i < self.stage_nodes.len() {
                Err(at(line, format!("{what}={from} refers to a later stage (line {}); a stage can only use stages defined before it", self.stage_nodes[i].0.start_line)))
            } else {
                Err(at(line, format!("invalid stage index {from} in {what}: the Dockerfile has {} stages (0 to {})", self.stage_nodes.len(), self.stage_nodes.len() - 1)))
            };
        }
        if let Some(&i) = self.names.get(&lower) {
            return Ok(StageRef::Stage(i));
        }
        if stage_name_of(current).as_deref() == Some(lower.as_str()) {
            return Err(at(line, format!("circular dependency detected on stage: {what}={from} refers to the stage it is in")));
        }
        if let Some((n, _)) = self.stage_nodes[self.index + 1..]
            .iter()
            .find(|(n, _)| stage_name_of(n).as_deref() == Some(lower.as_str()))
        {
            return Err(at(line, format!("{what}={from} refers to stage {lower:?} defined later (line {}); a stage can only use stages defined before it", n.start_line)));
        }
        if lower == "scratch" {
            return Ok(StageRef::Scratch);
        }
        Ok(StageRef::Image(from.to_string()))
    }
}
