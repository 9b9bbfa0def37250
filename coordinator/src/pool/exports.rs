//! What each stage of a farm build must leave in the blob store for its consumers.
use std::collections::BTreeMap;

use model::frontend::instructions::Instruction;
use model::frontend::plan::{Plan, StageRef};
use model::task::Export;

/// What every stage of a plan must export for its consumers on other workers: the image
/// for FROM consumers and the target (when the client wants it back), the copied paths for COPY --from and mount from=
/// consumers (the image when a path has wildcards).
pub fn exports(plan: &Plan, target_image: bool) -> BTreeMap<usize, Export> {
    let mut out: BTreeMap<usize, Export> = BTreeMap::new();
    if target_image {
        out.entry(plan.target).or_default().image = true;
    }
    for s in plan.stages.iter().filter(|s| plan.built[s.index]) {
        if let StageRef::Stage(p) = s.base {
            out.entry(p).or_default().image = true;
        }
        for pi in &s.instructions {
            if let (Some(StageRef::Stage(src)), Instruction::Copy(c)) =
                (&pi.copy_from, &pi.instruction)
            {
                let e = out.entry(*src).or_default();
                for p in &c.sources {
                    if p.contains(['*', '?', '[', '$']) {
                        e.image = true;
                    } else {
                        e.paths.insert(absolute(p));
                    }
                }
            }
            if let Instruction::Run(r) = &pi.instruction {
                for (m, from) in r.mounts.iter().zip(&pi.mount_from) {
                    if let Some(StageRef::Stage(src)) = from {
                        let p = m.source.clone().unwrap_or_else(|| "/".into());
                        out.entry(*src).or_default().paths.insert(absolute(&p));
                    }
                }
            }
        }
    }
    out
}

fn absolute(p: &str) -> String {
    let clean = model::keys::clean_source(p);
    format!("/{clean}")
}
