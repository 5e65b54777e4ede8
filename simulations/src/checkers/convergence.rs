//! Once the faults heal, every replica applies the same log and so holds
//! the same state.

use super::Final;

pub fn check(view: &Final<'_>) -> Result<(), String> {
    let Some((first, reference)) = view.replicas.first() else {
        return Err("no replica to compare".into());
    };
    for (node, state) in &view.replicas[1..] {
        if state != reference {
            return Err(format!(
                "node {node} differs from node {first} (clock {} vs {})",
                state.clock_ms(),
                reference.clock_ms()
            ));
        }
    }
    Ok(())
}
