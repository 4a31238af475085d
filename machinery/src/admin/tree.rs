//! Task trees: a chain, group or chord recovered with each member's state.
//!
//! A stored [`TaskState`](crate::wire::TaskState) names no other task, so the structure comes
//! from what workers record when a task with links runs (the `links:` and `parent:` keys, see
//! [`keys`](super::keys)): the task's `OnSuccess` and `OnError` signatures, nested as they
//! are in the message (a chain's later links included, with the UUIDs the worker gives them),
//! its chord callback and its group. A group's members come from the group record in the
//! result backend (Go's `GroupMeta`).
//!
//! What can be recovered:
//! - from any task of a chain whose first task ran on a worker with the registry on: the
//!   whole chain from that first task (walking `parent:` up, then the links down);
//! - from a member of a group or chord: the group's members (from the backend's group
//!   record, on backends that keep one: Redis, memory) and the chord callback;
//! - every member's current state (one `MGET`).
//!
//! What cannot: links of tasks that no registry-writing worker has run yet (a chain still
//! waiting for its first task shows as that task alone), tasks run by Go workers (they write
//! no links), anything after the links expire (with the results, `results_expire_in`), and
//! the producer side of a chain sent by a producer whose first task has not started.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::Admin;
use crate::error::Result;
use crate::wire::{Signature, State};

/// How a node hangs off its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Link {
    /// The top of the tree.
    Root,
    /// An `OnSuccess` callback (the next link of a chain).
    OnSuccess,
    /// An `OnError` callback.
    OnError,
    /// A member of a group.
    Member,
    /// A chord's callback, run when every member succeeded.
    ChordCallback,
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeKind {
    /// A task.
    Task,
    /// A group (or a chord's group): its members are the children.
    Group,
}

/// A node of a task tree ([`Admin::tree`]).
///
/// A stored task state names no other task, so the structure comes from what workers record
/// when a task with links runs: its `OnSuccess` and `OnError` signatures, nested as they are
/// in the message (a chain's later links included, with the UUIDs the worker gives them), its
/// chord callback and its group. A group's members come from the group record in the result
/// backend (Go's `GroupMeta`).
///
/// What can be recovered:
/// - from any task of a chain whose first task ran on a worker with the registry on: the
///   whole chain from that first task;
/// - from a member of a group or chord, or from the chord callback once a member ran: the
///   group's members (from the backend's group record, on backends that keep one: Redis,
///   memory) and the chord callback;
/// - every member's current state (one batched read).
///
/// What cannot: links of tasks that no registry-writing worker has run yet (a chain still
/// waiting for its first task shows as that task alone), tasks run by Go workers (they write
/// no links), anything after the links expire (with the results, `results_expire_in`), and
/// the tree without the registry's Redis (the task alone, with its state).
///
/// ```
/// use machinery::admin::{Link, NodeKind, TreeNode};
/// let node = TreeNode::task("task_1", "add", Link::Root);
/// assert_eq!(node.kind, NodeKind::Task);
/// assert!(node.children.is_empty());
/// ```
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct TreeNode {
    /// Task or group.
    pub kind: NodeKind,
    /// The task or group UUID.
    pub uuid: String,
    /// The task's name (empty for a group, or when unknown).
    pub name: String,
    /// How it hangs off its parent.
    pub link: Link,
    /// The stored state (`None`: no state stored, or a group).
    pub state: Option<State>,
    /// The stored error, when the state has one.
    pub error: Option<String>,
    /// Its callbacks, or a group's members and chord callback.
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    /// A task node without state or children.
    pub fn task(uuid: impl Into<String>, name: impl Into<String>, link: Link) -> TreeNode {
        TreeNode {
            kind: NodeKind::Task,
            uuid: uuid.into(),
            name: name.into(),
            link,
            state: None,
            error: None,
            children: Vec::new(),
        }
    }

    /// Every node, depth first.
    pub fn walk(&self) -> Vec<&TreeNode> {
        let mut out = vec![self];
        for child in &self.children {
            out.extend(child.walk());
        }
        out
    }

    fn walk_mut(&mut self, f: &mut impl FnMut(&mut TreeNode)) {
        f(self);
        for child in &mut self.children {
            child.walk_mut(f);
        }
    }
}

/// The links of a task as a worker records them: compact JSON, nested as in the message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Shape {
    /// UUID.
    pub(crate) u: String,
    /// Name.
    pub(crate) n: String,
    /// `OnSuccess`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) s: Vec<Shape>,
    /// `OnError`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) e: Vec<Shape>,
    /// Chord callback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) c: Option<Box<Shape>>,
    /// Group UUID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) g: String,
}

/// The most nodes one recorded shape holds; deeper links are left out.
pub(crate) const MAX_SHAPE_NODES: usize = 256;
/// The most `parent:` steps followed up.
const MAX_DEPTH: usize = 64;
/// The largest `links:` value read.
pub(crate) const MAX_LINKS_BYTES: usize = 256 * 1024;

impl Shape {
    /// Whether a signature has anything worth recording.
    pub(crate) fn has_links(signature: &Signature) -> bool {
        !signature.on_success.is_empty()
            || !signature.on_error.is_empty()
            || signature.chord_callback.is_some()
            || !signature.group_uuid.is_empty()
    }

    /// The shape of `signature`, with the UUIDs a worker gives callbacks that have none
    /// (derived from their parent's, as the worker derives them), at most
    /// [`MAX_SHAPE_NODES`] nodes.
    pub(crate) fn of(signature: &Signature) -> Shape {
        let mut budget = MAX_SHAPE_NODES;
        Shape::build(signature, &signature.uuid, &mut budget)
    }

    fn build(signature: &Signature, uuid: &str, budget: &mut usize) -> Shape {
        *budget = budget.saturating_sub(1);
        let mut shape = Shape {
            u: uuid.to_owned(),
            n: signature.name.clone(),
            g: signature.group_uuid.clone(),
            ..Shape::default()
        };
        for (role, list, out) in [
            ("on_success", &signature.on_success, &mut shape.s),
            ("on_error", &signature.on_error, &mut shape.e),
        ] {
            for (i, child) in list.iter().enumerate() {
                if *budget == 0 {
                    break;
                }
                let uuid = if child.uuid.is_empty() {
                    crate::worker::derived_uuid(uuid, role, i)
                } else {
                    child.uuid.clone()
                };
                out.push(Shape::build(child, &uuid, budget));
            }
        }
        if let Some(callback) = &signature.chord_callback {
            if *budget > 0 {
                // A chord callback's UUID is fixed by the producer.
                shape.c = Some(Box::new(Shape::build(callback, &callback.uuid, budget)));
            }
        }
        shape
    }

    /// `(child, parent)` for every link below this node.
    pub(crate) fn parents(&self, out: &mut Vec<(String, String)>) {
        for child in self.s.iter().chain(&self.e) {
            out.push((child.u.clone(), self.u.clone()));
            child.parents(out);
        }
        if let Some(callback) = &self.c {
            if !callback.u.is_empty() {
                out.push((callback.u.clone(), self.u.clone()));
            }
        }
    }

    fn into_node(self, link: Link) -> TreeNode {
        let mut node = TreeNode::task(self.u, self.n, link);
        node.children
            .extend(self.s.into_iter().map(|s| s.into_node(Link::OnSuccess)));
        node.children
            .extend(self.e.into_iter().map(|s| s.into_node(Link::OnError)));
        node
    }
}

/// Builds the tree `uuid` belongs to.
pub(super) async fn build(admin: &Admin, uuid: &str) -> Result<TreeNode> {
    let mut tree = match structure(admin, uuid).await {
        Ok(tree) => tree,
        // Without the registry's Redis the task alone, with its state.
        Err(e) if e.kind() == crate::ErrorKind::Unsupported => {
            TreeNode::task(uuid, String::new(), Link::Root)
        }
        Err(e) => return Err(e),
    };
    fill_states(admin, &mut tree).await?;
    Ok(tree)
}

#[cfg(not(feature = "redis"))]
async fn structure(admin: &Admin, uuid: &str) -> Result<TreeNode> {
    let _ = admin.ops()?;
    Ok(TreeNode::task(uuid, String::new(), Link::Root))
}

#[cfg(feature = "redis")]
async fn structure(admin: &Admin, uuid: &str) -> Result<TreeNode> {
    let ops = admin.ops()?;
    // Up to the first recorded ancestor.
    let mut root = uuid.to_owned();
    let mut seen = BTreeSet::new();
    for _ in 0..MAX_DEPTH {
        if !seen.insert(root.clone()) {
            break;
        }
        match ops.parent(&root).await? {
            Some(parent) => root = parent,
            None => break,
        }
    }
    let shape = ops
        .links(std::slice::from_ref(&root))
        .await?
        .pop()
        .flatten()
        .unwrap_or_else(|| Shape {
            u: root.clone(),
            ..Shape::default()
        });
    if shape.g.is_empty() {
        return Ok(shape.into_node(Link::Root));
    }
    // A group member: the group, its members and the chord callback.
    let group_uuid = shape.g.clone();
    let mut chord = shape.c.clone();
    let members = match admin.backend()?.group_meta(&group_uuid).await {
        Ok(Some(meta)) => meta.task_uuids,
        _ => vec![shape.u.clone()],
    };
    let shapes = ops.links(&members).await?;
    let mut group = TreeNode {
        kind: NodeKind::Group,
        uuid: group_uuid,
        name: String::new(),
        link: Link::Root,
        state: None,
        error: None,
        children: Vec::new(),
    };
    let mut own = Some(shape);
    for (member, found) in members.into_iter().zip(shapes) {
        let member_shape = match found {
            Some(found) => found,
            None if own.as_ref().is_some_and(|s| s.u == member) => own.take().unwrap_or_default(),
            None => Shape {
                u: member,
                ..Shape::default()
            },
        };
        if chord.is_none() {
            chord.clone_from(&member_shape.c);
        }
        group.children.push(member_shape.into_node(Link::Member));
    }
    if let Some(callback) = chord {
        group.children.push(callback.into_node(Link::ChordCallback));
    }
    Ok(group)
}

/// Reads every task node's state in one batch.
async fn fill_states(admin: &Admin, tree: &mut TreeNode) -> Result<()> {
    let Ok(backend) = admin.backend() else {
        return Ok(());
    };
    let uuids: Vec<String> = tree
        .walk()
        .into_iter()
        .filter(|n| n.kind == NodeKind::Task)
        .map(|n| n.uuid.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let states = backend.get_states(&uuids).await?;
    let by_uuid: HashMap<String, crate::wire::TaskState> = uuids
        .into_iter()
        .zip(states)
        .filter_map(|(u, s)| s.map(|s| (u, s)))
        .collect();
    tree.walk_mut(&mut |node| {
        if let Some(state) = by_uuid.get(&node.uuid) {
            node.state = Some(state.state);
            if node.name.is_empty() {
                node.name.clone_from(&state.task_name);
            }
            if !state.error.is_empty() {
                node.error = Some(state.error.clone());
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_records_its_later_links_with_derived_uuids() {
        let mut first = Signature::new("first");
        first.uuid = "task_1".into();
        let mut third = Signature::new("third");
        third.uuid = "task_3".into();
        let mut second = Signature::new("second");
        second.uuid = String::new(); // left empty by its producer: the worker derives one
        second.on_success.push(third);
        first.on_success.push(second);
        let shape = Shape::of(&first);
        let second_uuid = crate::worker::derived_uuid("task_1", "on_success", 0);
        assert_eq!(shape.s[0].u, second_uuid);
        assert_eq!(shape.s[0].s[0].u, "task_3");
        let mut parents = Vec::new();
        shape.parents(&mut parents);
        assert_eq!(
            parents,
            [
                (second_uuid.clone(), "task_1".to_owned()),
                ("task_3".to_owned(), second_uuid)
            ]
        );
        let json = serde_json::to_string(&shape).unwrap();
        assert_eq!(serde_json::from_str::<Shape>(&json).unwrap(), shape);
    }
}
