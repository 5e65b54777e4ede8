//! Where the nodes of a cluster run (region, zone) and how to reach them, and
//! the one property a topology must have: losing any one zone of the primary
//! region leaves a Raft majority.
//!
//! Two zones alone cannot have that property. With voters split 2 + 2 a
//! majority is 3, so losing either zone leaves 2: no quorum. With 3 + 2,
//! losing the zone of 3 leaves 2 of 5: no quorum. Whichever zone is bigger,
//! losing it loses the majority. A **tiebreaker** voter in a third failure
//! domain (by default a node in the DR region) fixes it: 2 + 2 + 1 = 5
//! voters, and losing either zone leaves 3 of 5. The tiebreaker carries no
//! shopper traffic; it only votes and stores the log.
//!
//! A node may instead be a **replica** in the DR region: it follows every
//! group's log as a Raft learner, off the commit path (no commit waits for
//! it, so a slow or unreachable DR region never slows checkout), serves
//! reads from its copy and forwards writes to the primary.

use std::collections::{BTreeMap, BTreeSet};

use openraft::BasicNode;
use serde::{Deserialize, Serialize};

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Raft node id; unique, not zero.
    pub id: u64,
    /// Region, e.g. `primary` or `dr`.
    pub region: String,
    /// Failure domain inside the region, e.g. `a`, `b`, `t` (tiebreaker).
    pub zone: String,
    /// Address of the node's public HTTP API.
    pub api: String,
    /// Address of the node's peer (Raft) transport.
    pub peer: String,
    /// Voter (the default) or DR replica.
    #[serde(default)]
    pub role: Role,
}

/// What a node is to every group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Votes and stores the log; a commit needs a majority of voters.
    #[default]
    Voter,
    /// Follows the log asynchronously as a Raft learner, in a region other
    /// than the primary: the DR copy.
    Replica,
}

/// The nodes of a cluster: the voters of every group, and the DR replicas
/// that follow them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The region that takes writes.
    pub primary_region: String,
    /// All nodes, in any order.
    pub nodes: Vec<NodeSpec>,
}

/// What makes a topology unusable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// No nodes at all.
    #[error("the topology names no nodes")]
    Empty,
    /// Ids must be unique and not zero.
    #[error("node id {0} is zero or used twice")]
    BadId(u64),
    /// Two nodes share an address.
    #[error("address {0} is used by two nodes")]
    SharedAddress(String),
    /// No node of the primary region.
    #[error("no node is in the primary region {0:?}")]
    NoPrimary(String),
    /// A replica in the primary region would be no disaster-recovery copy.
    #[error("replica {0} is in the primary region; DR replicas belong in another region")]
    ReplicaInPrimary(u64),
    /// Losing this zone would leave no majority.
    #[error("losing zone {zone:?} leaves {left} of {voters} voters: no majority (add a tiebreaker in a third failure domain)")]
    ZoneLossLosesQuorum {
        /// The zone whose loss is fatal.
        zone: String,
        /// Voters left without it.
        left: usize,
        /// All voters.
        voters: usize,
    },
}

impl Topology {
    /// A cluster of one node, for local use and the demo.
    pub fn single(id: u64, api: &str, peer: &str) -> Topology {
        Topology {
            primary_region: "primary".into(),
            nodes: vec![NodeSpec {
                id,
                region: "primary".into(),
                zone: "a".into(),
                api: api.into(),
                peer: peer.into(),
                role: Role::Voter,
            }],
        }
    }

    /// Checks ids, addresses, and that any one zone of the primary region
    /// can be lost without losing the majority (a single node is exempt
    /// from the last two: it has no peers to reach or survive with).
    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.nodes.is_empty() {
            return Err(TopologyError::Empty);
        }
        let mut ids = BTreeSet::new();
        for node in &self.nodes {
            if node.id == 0 || !ids.insert(node.id) {
                return Err(TopologyError::BadId(node.id));
            }
        }
        if !self.voters().any(|n| n.region == self.primary_region) {
            return Err(TopologyError::NoPrimary(self.primary_region.clone()));
        }
        if let Some(replica) = self.replica_specs().find(|n| n.region == self.primary_region) {
            return Err(TopologyError::ReplicaInPrimary(replica.id));
        }
        if self.nodes.len() == 1 {
            // No peers: nothing to reach, nothing to survive.
            return Ok(());
        }
        let mut addresses = BTreeSet::new();
        for node in &self.nodes {
            for address in [&node.api, &node.peer] {
                if !addresses.insert(address.as_str()) {
                    return Err(TopologyError::SharedAddress(address.clone()));
                }
            }
        }
        let voters = self.voters().count();
        for zone in self.primary_zones() {
            let left = self.voters().filter(|n| !(n.region == self.primary_region && n.zone == zone)).count();
            if left <= voters / 2 {
                return Err(TopologyError::ZoneLossLosesQuorum { zone, left, voters });
            }
        }
        Ok(())
    }

    /// The zones of the primary region, sorted.
    pub fn primary_zones(&self) -> BTreeSet<String> {
        self.voters().filter(|n| n.region == self.primary_region).map(|n| n.zone.clone()).collect()
    }

    /// The voters, in the order the config names them.
    pub fn voters(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.iter().filter(|n| n.role == Role::Voter)
    }

    fn replica_specs(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.iter().filter(|n| n.role == Role::Replica)
    }

    /// A node by id.
    pub fn node(&self, id: u64) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The nodes of one zone of one region.
    pub fn zone(&self, region: &str, zone: &str) -> Vec<&NodeSpec> {
        self.nodes.iter().filter(|n| n.region == region && n.zone == zone).collect()
    }

    /// The Raft membership every group starts with: the voters, reached at
    /// their peer address.
    pub fn members(&self) -> BTreeMap<u64, BasicNode> {
        self.voters().map(|n| (n.id, BasicNode::new(&n.peer))).collect()
    }

    /// The DR replicas, which every group's leader adds as learners.
    pub fn replicas(&self) -> BTreeMap<u64, BasicNode> {
        self.replica_specs().map(|n| (n.id, BasicNode::new(&n.peer))).collect()
    }

    /// The node that initialises a new cluster's groups: the lowest id of
    /// the nodes that may lead, so that starting every node with the same
    /// config bootstraps exactly once, and the first leader is in the
    /// primary region (initialising makes the node campaign at once).
    pub fn bootstrapper(&self) -> Option<u64> {
        self.nodes.iter().map(|n| n.id).filter(|&id| self.may_lead(id)).min()
    }

    /// Whether node `id` may campaign to lead: only nodes of the primary
    /// region do. A tiebreaker in another region votes, so either zone can
    /// be lost, but does not lead, so commits do not wait on a cross-region
    /// round trip; only when no primary node can be elected without it does
    /// it lead, briefly (see `Group::tend_holds`). (A tiebreaker placed in a
    /// third zone of the primary region may lead.)
    pub fn may_lead(&self, id: u64) -> bool {
        self.node(id).is_some_and(|node| node.region == self.primary_region && node.role == Role::Voter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_primary_region_nodes_may_lead() {
        let topology = Topology {
            primary_region: "primary".into(),
            nodes: vec![node(1, "primary", "a"), node(2, "primary", "b"), node(3, "dr", "t")],
        };
        assert_eq!([1, 2, 3, 4].map(|id| topology.may_lead(id)), [true, true, false, false]);
        let tiebreaker_first = Topology {
            primary_region: "primary".into(),
            nodes: vec![node(1, "dr", "t"), node(2, "primary", "a"), node(3, "primary", "b")],
        };
        assert_eq!(tiebreaker_first.bootstrapper(), Some(2));
    }

    fn node(id: u64, region: &str, zone: &str) -> NodeSpec {
        NodeSpec {
            id,
            region: region.into(),
            zone: zone.into(),
            api: format!("127.0.0.1:{}", 8000 + id),
            peer: format!("127.0.0.1:{}", 9000 + id),
            role: Role::Voter,
        }
    }

    fn replica(id: u64, region: &str) -> NodeSpec {
        NodeSpec { role: Role::Replica, ..node(id, region, "d") }
    }

    #[test]
    fn dr_replicas_follow_without_voting_or_leading() {
        let mut nodes = vec![
            node(1, "primary", "a"),
            node(2, "primary", "a"),
            node(3, "primary", "b"),
            node(4, "primary", "b"),
            node(5, "dr", "t"),
            replica(6, "dr"),
        ];
        let shape = topology(nodes.clone());
        assert_eq!(shape.validate(), Ok(()));
        assert_eq!(shape.members().keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(shape.replicas().keys().copied().collect::<Vec<_>>(), vec![6]);
        assert!(!shape.may_lead(6));
        // A replica does not count towards surviving a zone's loss.
        nodes[4] = replica(5, "dr");
        assert!(matches!(topology(nodes.clone()).validate(), Err(TopologyError::ZoneLossLosesQuorum { .. })));
        nodes[4] = node(5, "dr", "t");
        nodes[5] = replica(6, "primary");
        assert_eq!(topology(nodes).validate(), Err(TopologyError::ReplicaInPrimary(6)));
    }

    fn topology(nodes: Vec<NodeSpec>) -> Topology {
        Topology { primary_region: "primary".into(), nodes }
    }

    #[test]
    fn two_zones_alone_cannot_survive_losing_the_larger_half() {
        let even = topology(vec![
            node(1, "primary", "a"),
            node(2, "primary", "a"),
            node(3, "primary", "b"),
            node(4, "primary", "b"),
        ]);
        assert!(matches!(even.validate(), Err(TopologyError::ZoneLossLosesQuorum { left: 2, voters: 4, .. })));
        let odd = topology(vec![
            node(1, "primary", "a"),
            node(2, "primary", "a"),
            node(3, "primary", "a"),
            node(4, "primary", "b"),
            node(5, "primary", "b"),
        ]);
        assert_eq!(odd.validate(), Err(TopologyError::ZoneLossLosesQuorum { zone: "a".into(), left: 2, voters: 5 }));
    }

    #[test]
    fn a_tiebreaker_in_a_third_failure_domain_makes_either_zone_survivable() {
        let shape = topology(vec![
            node(1, "primary", "a"),
            node(2, "primary", "a"),
            node(3, "primary", "b"),
            node(4, "primary", "b"),
            node(5, "dr", "t"),
        ]);
        assert_eq!(shape.validate(), Ok(()));
        assert_eq!(shape.bootstrapper(), Some(1));
        assert_eq!(shape.members().len(), 5);
        assert_eq!(shape.zone("primary", "b").iter().map(|n| n.id).collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn ids_and_addresses_are_unique() {
        assert_eq!(
            topology(vec![node(1, "primary", "a"), node(1, "primary", "b")]).validate(),
            Err(TopologyError::BadId(1))
        );
        assert_eq!(topology(vec![node(0, "primary", "a")]).validate(), Err(TopologyError::BadId(0)));
        assert_eq!(Topology::single(1, "127.0.0.1:8080", "127.0.0.1:8080").validate(), Ok(()));
        let mut clash = vec![node(1, "primary", "a"), node(2, "primary", "b"), node(3, "dr", "t")];
        clash[1].peer = clash[0].api.clone();
        assert!(matches!(topology(clash).validate(), Err(TopologyError::SharedAddress(_))));
        assert_eq!(topology(vec![node(1, "dr", "t")]).validate(), Err(TopologyError::NoPrimary("primary".into())));
    }
}
