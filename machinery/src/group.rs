//! Groups (tasks in parallel) and chords (a callback once a group has finished).

use std::fmt;

use crate::error::Error;
use crate::signature::{Decoder, Full, Sendable, Signature, Variadic};
use crate::wire;

/// Tasks that run in parallel (Go's `NewGroup`); send with
/// [`Server::send_group`](crate::Server::send_group).
///
/// Every member carries the group's UUID and size, and the result backend records the group,
/// so that a [`Chord`] can run its callback once every member has finished.
///
/// ```
/// use machinery::{task, Group};
///
/// #[task]
/// fn add(#[variadic] args: Vec<i64>) -> i64 { args.iter().sum() }
///
/// #[task]
/// fn multiply(#[variadic] args: Vec<i64>) -> i64 { args.iter().product() }
///
/// let group = Group::new([add::signature(vec![1, 1]), add::signature(vec![2, 2])]);
/// // multiply receives [2, 4], in the group's order: (1 + 1) * (2 + 2).
/// let chord = group.chord(multiply::signature(vec![]));
/// # let _ = chord;
/// ```
#[must_use = "a group does nothing until it is sent"]
pub struct Group<O> {
    pub(crate) members: Vec<(wire::Signature, Decoder<O>)>,
    pub(crate) error: Option<Error>,
}

impl<O> Group<O> {
    /// A group of signatures. Each must be a single task (not a chain).
    pub fn new<K: Sendable>(signatures: impl IntoIterator<Item = Signature<O, K>>) -> Self {
        let mut group = Group {
            members: Vec::new(),
            error: None,
        };
        for signature in signatures {
            if signature.task_uuids().len() > 1 {
                group.error.get_or_insert(Error::encode(format!(
                    "a group member must be a single task, not a chain (`{}`)",
                    signature.name()
                )));
            }
            match signature.into_parts() {
                Ok((raw, _, decode)) => group.members.push((raw, decode)),
                Err(e) => {
                    group.error.get_or_insert(e);
                }
            }
        }
        group
    }

    /// The number of tasks.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no tasks.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A chord: `callback` runs once every member has succeeded, with their results appended
    /// to its arguments in the group's order (a [`Variadic`] callback), or with its own
    /// arguments only (a [`Full`] one). If a member fails, the callback does not run: its
    /// error callbacks do, with the member's error.
    pub fn chord<O2, K2: ChordCallback<O>>(self, callback: Signature<O2, K2>) -> Chord<O2> {
        let (mut error, members) = (self.error, self.members);
        let callback = match callback.into_parts() {
            Ok(parts) => Some(parts),
            Err(e) => {
                error.get_or_insert(e);
                None
            }
        };
        Chord {
            members: members.into_iter().map(|(raw, _)| raw).collect(),
            callback: callback.map(|(mut raw, links, decode)| {
                raw.immutable = !K2::APPENDS;
                (raw, links, decode)
            }),
            error,
        }
    }
}

impl<O> fmt::Debug for Group<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// A group and a callback (Go's `NewChord`); see [`Group::chord`]. Send with
/// [`Server::send_chord`](crate::Server::send_chord).
#[must_use = "a chord does nothing until it is sent"]
pub struct Chord<O> {
    pub(crate) members: Vec<wire::Signature>,
    pub(crate) callback: Option<(wire::Signature, Vec<String>, Decoder<O>)>,
    pub(crate) error: Option<Error>,
}

impl<O> fmt::Debug for Chord<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chord")
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// Implemented by the signature kinds that can be a chord's callback for members returning `T`.
#[diagnostic::on_unimplemented(
    message = "this signature cannot be the callback of a chord whose tasks return `{T}`",
    label = "not a chord callback for `{T}` results",
    note = "a chord callback is either a `#[variadic]` task over `{T}` (it receives every result) or a signature with all its arguments"
)]
pub trait ChordCallback<T> {
    /// Whether the members' results are appended to the callback's arguments.
    const APPENDS: bool;
}

impl<T> ChordCallback<T> for Full {
    const APPENDS: bool = false;
}

impl<T> ChordCallback<T> for Variadic<T> {
    const APPENDS: bool = true;
}
