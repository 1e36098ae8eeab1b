//! Distributed reference counting: what this node exported to whom, what it
//! imported from whom, and the release protocol between them.
//!
//! # The rules
//!
//! * **Count the sends.** Each time an exporter puts a reference to one of
//!   its actors into a frame for peer P, P's count on that actor goes up by
//!   one ([`Exports::note_sent`]). Nothing is decremented on the sending side.
//! * **Release what you received.** The importer counts the references it
//!   received per actor. When its last local handle drops, it sends one
//!   release carrying that count and forgets the actor
//!   ([`Imports::handles_dropped`]). The exporter subtracts the count; at
//!   zero, P no longer holds the actor; with no holder left and no pin, the
//!   export is freed and its slot's generation moves on.
//! * Because a release carries the count it releases, a reference sent again
//!   while a release is in flight is safe: the exporter's count stays above
//!   zero, and the importer starts a fresh entry when the new one arrives
//!   (Cap'n Proto's scheme).
//! * **Third-party hand-off.** When B passes C a reference to A's actor, B
//!   lends it ([`Imports::lend`]): B's own import cannot be released while
//!   the loan is open. C asks A for its own count (acquire), and once A
//!   answered, C settles B's loan (unlend). A never sees a moment where
//!   nobody counts the actor.
//! * **Connection loss.** A lost peer's counts are dropped at once on the
//!   exporting side ([`Exports::peer_lost`]); on the importing side every
//!   import from it is dead and loans to it are settled
//!   ([`Imports::peer_lost`]).

use std::collections::{BTreeMap, HashMap};

use slab::Slab;

use crate::error::RefError;
use crate::id::{ActorId, Incarnation, LocalId, NodeId};
use crate::wire::ReleaseEntry;

/// One peer's hold on an exported actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The peer.
    pub peer: NodeId,
    /// References sent to it and not yet released.
    pub count: u64,
}

#[derive(Debug)]
struct Export<T> {
    generation: u32,
    pinned: bool,
    holders: Vec<Holder>,
    value: T,
}

/// The actors this node exported, with each peer's count.
///
/// `T` is whatever the caller keeps per actor (its mailbox handle, say).
#[derive(Debug)]
pub struct Exports<T> {
    node: NodeId,
    incarnation: Incarnation,
    slab: Slab<Export<T>>,
    generations: Vec<u32>,
    held_by_peer: HashMap<NodeId, u64>,
    max_per_peer: u64,
}

impl<T> Exports<T> {
    /// An empty table for `node`'s `incarnation`; a peer may hold at most
    /// `max_per_peer` distinct actors.
    pub fn new(node: NodeId, incarnation: Incarnation, max_per_peer: u64) -> Self {
        Self {
            node,
            incarnation,
            slab: Slab::new(),
            generations: Vec::new(),
            held_by_peer: HashMap::new(),
            max_per_peer,
        }
    }

    /// Exports `value`. A pinned export (a registered name) stays when no
    /// peer holds it; an unpinned one is freed when the last holder releases.
    pub fn export(&mut self, value: T, pinned: bool) -> ActorId {
        let entry = self.slab.vacant_entry();
        let index = entry.key();
        if self.generations.len() <= index {
            self.generations.resize(index + 1, 0);
        }
        let generation = self.generations[index];
        entry.insert(Export {
            generation,
            pinned,
            holders: Vec::new(),
            value,
        });
        self.id(LocalId {
            index: index as u32,
            generation,
        })
    }

    /// The full id of a local id on this node.
    pub fn id(&self, local: LocalId) -> ActorId {
        ActorId {
            node: self.node,
            incarnation: self.incarnation,
            local,
        }
    }

    fn entry(&self, incarnation: Incarnation, local: LocalId) -> Result<&Export<T>, RefError> {
        let stale = || RefError::Stale(self.id(local).to_string());
        if incarnation != self.incarnation {
            return Err(stale());
        }
        match self.slab.get(local.index as usize) {
            Some(e) if e.generation == local.generation => Ok(e),
            Some(_) => Err(stale()),
            None if (local.index as usize) < self.generations.len() => Err(stale()),
            None => Err(RefError::Unknown(self.id(local).to_string())),
        }
    }

    fn entry_mut(
        &mut self,
        incarnation: Incarnation,
        local: LocalId,
    ) -> Result<&mut Export<T>, RefError> {
        self.entry(incarnation, local)?;
        Ok(self
            .slab
            .get_mut(local.index as usize)
            .expect("checked above"))
    }

    /// The value of a live export, checking incarnation and generation.
    pub fn get(&self, incarnation: Incarnation, local: LocalId) -> Result<&T, RefError> {
        self.entry(incarnation, local).map(|e| &e.value)
    }

    /// Mutable access to a live export's value.
    pub fn get_mut(
        &mut self,
        incarnation: Incarnation,
        local: LocalId,
    ) -> Result<&mut T, RefError> {
        self.entry_mut(incarnation, local).map(|e| &mut e.value)
    }

    /// Pins or unpins an export.
    pub fn set_pinned(&mut self, local: LocalId, pinned: bool) -> Result<(), RefError> {
        let inc = self.incarnation;
        self.entry_mut(inc, local)?.pinned = pinned;
        Ok(())
    }

    /// A reference to `local` goes out to `peer` (in a message, or as the
    /// answer to an acquire): its count goes up by one.
    pub fn note_sent(&mut self, local: LocalId, peer: NodeId) -> Result<(), RefError> {
        let inc = self.incarnation;
        let max = self.max_per_peer;
        let held = self.held_by_peer.get(&peer).copied().unwrap_or(0);
        let e = self.entry_mut(inc, local)?;
        if let Some(h) = e.holders.iter_mut().find(|h| h.peer == peer) {
            h.count += 1;
            return Ok(());
        }
        if held >= max {
            return Err(RefError::TooManyRefs { peer, max });
        }
        e.holders.push(Holder { peer, count: 1 });
        *self.held_by_peer.entry(peer).or_insert(0) += 1;
        Ok(())
    }

    /// `peer` released `count` references to `local`. Returns the freed
    /// value when that was the last hold on an unpinned export.
    ///
    /// Releasing more than was given is the peer's protocol error. A release
    /// for an export already gone (the actor stopped) is `Unknown` or
    /// `Stale`, which callers should ignore.
    pub fn release(
        &mut self,
        peer: NodeId,
        incarnation: Incarnation,
        local: LocalId,
        count: u64,
    ) -> Result<Option<(ActorId, T)>, RefError> {
        let id = self.id(local);
        let e = self.entry_mut(incarnation, local)?;
        let Some(pos) = e.holders.iter().position(|h| h.peer == peer) else {
            return Err(RefError::OverRelease {
                actor: id.to_string(),
                released: count,
                held: 0,
            });
        };
        let h = &mut e.holders[pos];
        if count > h.count {
            return Err(RefError::OverRelease {
                actor: id.to_string(),
                released: count,
                held: h.count,
            });
        }
        h.count -= count;
        if h.count > 0 {
            return Ok(None);
        }
        e.holders.swap_remove(pos);
        self.drop_peer_hold(peer);
        Ok(self.free_if_unheld(local))
    }

    fn drop_peer_hold(&mut self, peer: NodeId) {
        if let Some(n) = self.held_by_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.held_by_peer.remove(&peer);
            }
        }
    }

    /// Frees `local` if it is unpinned and no peer holds it (an export made
    /// for a message that was then not sent). Returns the freed value.
    pub fn free_if_unheld(&mut self, local: LocalId) -> Option<(ActorId, T)> {
        let inc = self.incarnation;
        self.entry(inc, local).ok()?;
        let e = &self.slab[local.index as usize];
        if e.pinned || !e.holders.is_empty() {
            return None;
        }
        self.free(local).map(|(id, v, _)| (id, v))
    }

    fn free(&mut self, local: LocalId) -> Option<(ActorId, T, Vec<Holder>)> {
        let index = local.index as usize;
        let e = self.slab.try_remove(index)?;
        self.generations[index] = self.generations[index].wrapping_add(1);
        Some((self.id(local), e.value, e.holders))
    }

    /// Removes an export whatever its holders (the actor stopped). Returns
    /// its value and who held it, so they can be told.
    pub fn unexport(&mut self, local: LocalId) -> Option<(T, Vec<Holder>)> {
        let inc = self.incarnation;
        self.entry(inc, local).ok()?;
        let (_, v, holders) = self.free(local)?;
        for h in &holders {
            self.drop_peer_hold(h.peer);
        }
        Some((v, holders))
    }

    /// Drops every count `peer` held; returns the exports that freed.
    pub fn peer_lost(&mut self, peer: NodeId) -> Vec<(ActorId, T)> {
        self.held_by_peer.remove(&peer);
        let mut touched = Vec::new();
        for (index, e) in self.slab.iter_mut() {
            let before = e.holders.len();
            e.holders.retain(|h| h.peer != peer);
            if e.holders.len() != before {
                touched.push(LocalId {
                    index: index as u32,
                    generation: e.generation,
                });
            }
        }
        touched
            .into_iter()
            .filter_map(|l| self.free_if_unheld(l))
            .collect()
    }

    /// Who holds `local`, and how many times (the leak detector's view).
    pub fn holders(&self, local: LocalId) -> &[Holder] {
        self.entry(self.incarnation, local)
            .map(|e| &e.holders[..])
            .unwrap_or(&[])
    }

    /// Distinct actors `peer` holds.
    pub fn held_by(&self, peer: NodeId) -> u64 {
        self.held_by_peer.get(&peer).copied().unwrap_or(0)
    }

    /// Live exports, pinned or not.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether no actor is exported.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every live export with its holders.
    pub fn iter(&self) -> impl Iterator<Item = (ActorId, &T, &[Holder])> + '_ {
        self.slab.iter().map(|(i, e)| {
            (
                self.id(LocalId {
                    index: i as u32,
                    generation: e.generation,
                }),
                &e.value,
                &e.holders[..],
            )
        })
    }
}

#[derive(Debug, Default)]
struct Import {
    /// Tells apart successive entries for the same actor, so a loan made
    /// from a dead entry never settles against a newer one.
    instance: u64,
    received: u64,
    live: bool,
    lent: u64,
    acquiring: bool,
    waiting_unlends: Vec<(NodeId, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Loan {
    actor: ActorId,
    borrower: NodeId,
    instance: u64,
}

/// What to do with a third-party reference that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOff {
    /// This node already counts the actor; the loan is settled (an unlend
    /// is queued, or will be once a pending acquire completes).
    Joined,
    /// Send an acquire for the actor to its owner, then report the answer
    /// with [`Imports::acquired`].
    MustAcquire,
}

/// The references this node holds to other nodes' actors.
#[derive(Debug, Default)]
pub struct Imports {
    entries: HashMap<ActorId, Import>,
    loans: HashMap<u64, Loan>,
    next_token: u64,
    next_instance: u64,
    releases: BTreeMap<NodeId, Vec<ReleaseEntry>>,
    unlends: Vec<(NodeId, u64)>,
}

impl Imports {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reference arrived from its owner. Returns true when this node did
    /// not hold the actor yet (the caller makes a new handle).
    pub fn receive_direct(&mut self, actor: ActorId) -> bool {
        let instance = &mut self.next_instance;
        let e = self.entries.entry(actor).or_insert_with(|| {
            *instance += 1;
            Import {
                instance: *instance,
                ..Import::default()
            }
        });
        let new = !e.live;
        e.received += 1;
        e.live = true;
        new
    }

    /// A reference arrived from `lender`, who is not its owner, under loan
    /// `token`.
    pub fn receive_third_party(&mut self, actor: ActorId, lender: NodeId, token: u64) -> HandOff {
        match self.entries.get_mut(&actor) {
            // An entry that counts nothing at the owner and asks nothing of
            // it is one the owner said is gone, kept for the loans made
            // from it: joining it would take a dead actor for a live one
            // (found by the three-node property test). Ask the owner, as
            // for a first hand-off; its answer makes the new handle live
            // or dead.
            Some(e) if e.received == 0 && !e.acquiring => {
                e.live = true;
                e.acquiring = true;
                e.waiting_unlends.push((lender, token));
                HandOff::MustAcquire
            }
            Some(e) => {
                e.live = true;
                if e.acquiring {
                    e.waiting_unlends.push((lender, token));
                } else {
                    self.unlends.push((lender, token));
                }
                HandOff::Joined
            }
            None => {
                self.next_instance += 1;
                self.entries.insert(
                    actor,
                    Import {
                        instance: self.next_instance,
                        live: true,
                        acquiring: true,
                        waiting_unlends: vec![(lender, token)],
                        ..Import::default()
                    },
                );
                HandOff::MustAcquire
            }
        }
    }

    /// The owner answered our acquire for `actor`. With `ok == false` the
    /// actor is gone: returns true, and the caller marks its handles dead.
    pub fn acquired(&mut self, actor: ActorId, ok: bool) -> Result<bool, RefError> {
        let e = self
            .entries
            .get_mut(&actor)
            .filter(|e| e.acquiring)
            .ok_or_else(|| RefError::Unknown(actor.to_string()))?;
        e.acquiring = false;
        self.unlends.append(&mut e.waiting_unlends);
        if ok {
            e.received += 1;
            self.maybe_release(actor);
            Ok(false)
        } else {
            // Nothing to release: the owner counted nothing for us. Loans
            // made from this entry stay valid until settled.
            e.live = false;
            if e.lent == 0 {
                self.entries.remove(&actor);
            }
            Ok(true)
        }
    }

    /// The last local handle to `actor` dropped.
    pub fn handles_dropped(&mut self, actor: ActorId) {
        if let Some(e) = self.entries.get_mut(&actor) {
            e.live = false;
            self.maybe_release(actor);
        }
    }

    /// Lends `actor` to `borrower` (this node passes it on); returns the
    /// token to put in the wire reference.
    pub fn lend(&mut self, actor: ActorId, borrower: NodeId) -> Result<u64, RefError> {
        let e = self
            .entries
            .get_mut(&actor)
            .ok_or_else(|| RefError::Unknown(actor.to_string()))?;
        e.lent += 1;
        let instance = e.instance;
        self.next_token += 1;
        self.loans.insert(
            self.next_token,
            Loan {
                actor,
                borrower,
                instance,
            },
        );
        Ok(self.next_token)
    }

    /// `from` settled loan `token`.
    pub fn unlend(&mut self, token: u64, from: NodeId) -> Result<(), RefError> {
        match self.loans.get(&token) {
            Some(l) if l.borrower == from => {}
            _ => return Err(RefError::UnknownToken(token)),
        }
        let loan = self.loans.remove(&token).expect("checked");
        self.settle(loan);
        Ok(())
    }

    fn settle(&mut self, loan: Loan) {
        if let Some(e) = self.entries.get_mut(&loan.actor) {
            if e.instance == loan.instance {
                e.lent -= 1;
                self.maybe_release(loan.actor);
            }
        }
    }

    fn maybe_release(&mut self, actor: ActorId) {
        let Some(e) = self.entries.get(&actor) else {
            return;
        };
        if e.live || e.lent > 0 || e.acquiring {
            return;
        }
        let received = e.received;
        self.entries.remove(&actor);
        if received > 0 {
            self.releases
                .entry(actor.node)
                .or_default()
                .push(ReleaseEntry {
                    incarnation: actor.incarnation,
                    target: actor.local,
                    count: received,
                });
        }
    }

    /// The connection to `peer` is gone. Returns the imports from it, now
    /// dead; loans to it are settled, and nothing more is sent to it.
    pub fn peer_lost(&mut self, peer: NodeId) -> Vec<ActorId> {
        self.releases.remove(&peer);
        self.unlends.retain(|(to, _)| *to != peer);
        let dead: Vec<ActorId> = self
            .entries
            .keys()
            .filter(|a| a.node == peer)
            .copied()
            .collect();
        for a in &dead {
            if let Some(mut e) = self.entries.remove(a) {
                self.unlends.append(&mut e.waiting_unlends);
            }
        }
        // Loans from `peer` are void: it forgot them with the connection.
        for e in self.entries.values_mut() {
            e.waiting_unlends.retain(|(lender, _)| *lender != peer);
        }
        self.unlends.retain(|(to, _)| *to != peer);
        // Loans to `peer` are settled: it will never unlend them. Loans of
        // the dead imports stay until their borrowers settle them; settling
        // then finds no entry and does nothing.
        let settled: Vec<u64> = self
            .loans
            .iter()
            .filter(|(_, l)| l.borrower == peer)
            .map(|(t, _)| *t)
            .collect();
        for t in settled {
            let loan = self.loans.remove(&t).expect("listed");
            self.settle(loan);
        }
        dead
    }

    /// The next batch of releases: all pending ones for one owner.
    pub fn poll_release(&mut self) -> Option<(NodeId, Vec<ReleaseEntry>)> {
        let owner = *self.releases.keys().next()?;
        self.releases.remove_entry(&owner)
    }

    /// The next loan to settle: (lender, token).
    pub fn poll_unlend(&mut self) -> Option<(NodeId, u64)> {
        self.unlends.pop()
    }

    /// Whether `actor` is imported and not yet released.
    pub fn contains(&self, actor: &ActorId) -> bool {
        self.entries.contains_key(actor)
    }

    /// Whether an acquire for `actor` is outstanding.
    pub fn is_acquiring(&self, actor: &ActorId) -> bool {
        self.entries.get(actor).is_some_and(|e| e.acquiring)
    }

    /// Imported actors not yet released.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is imported, lent, or waiting to be sent.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.loans.is_empty()
            && self.releases.is_empty()
            && self.unlends.is_empty()
    }

    /// Loans not yet settled.
    pub fn loans(&self) -> usize {
        self.loans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([1; 16]);
    const B: NodeId = NodeId([2; 16]);

    #[test]
    fn worked_example_release_in_flight() {
        // A exports x and sends it to B twice.
        let mut a: Exports<&str> = Exports::new(A, Incarnation(1), 100);
        let mut b = Imports::new();
        let x = a.export("x", false);
        a.note_sent(x.local, B).unwrap();
        assert!(b.receive_direct(x));
        a.note_sent(x.local, B).unwrap();
        assert!(!b.receive_direct(x));
        assert_eq!(a.holders(x.local), &[Holder { peer: B, count: 2 }]);
        // B drops its handle: release(2) goes out...
        b.handles_dropped(x);
        let (owner, rel) = b.poll_release().unwrap();
        assert_eq!((owner, rel[0].count), (A, 2));
        // ...while A sends x again.
        a.note_sent(x.local, B).unwrap();
        assert_eq!(a.release(B, x.incarnation, x.local, 2).unwrap(), None);
        assert_eq!(a.holders(x.local), &[Holder { peer: B, count: 1 }]);
        // The new reference arrives: a fresh entry; dropped, it releases 1.
        assert!(b.receive_direct(x));
        b.handles_dropped(x);
        let (_, rel) = b.poll_release().unwrap();
        assert_eq!(rel[0].count, 1);
        let freed = a.release(B, x.incarnation, x.local, 1).unwrap();
        assert_eq!(freed, Some((x, "x")));
        assert!(a.is_empty() && b.is_empty());
    }

    #[test]
    fn a_hand_off_after_the_owner_said_gone_is_not_joined() {
        // B holds x (from C, acquiring) and lends it on to D; the owner A
        // answers the acquire with "gone", but B keeps the entry for D's
        // loan. Another hand-off of x from C must not join that entry.
        const C: NodeId = NodeId([3; 16]);
        const D: NodeId = NodeId([4; 16]);
        let mut a: Exports<&str> = Exports::new(A, Incarnation(1), 100);
        let x = a.export("x", false);
        let mut b = Imports::new();
        assert_eq!(b.receive_third_party(x, C, 1), HandOff::MustAcquire);
        let to_d = b.lend(x, D).unwrap();
        assert!(b.acquired(x, false).unwrap(), "the handle is dead");
        assert_eq!(b.receive_third_party(x, C, 2), HandOff::MustAcquire);
        assert!(b.is_acquiring(&x));
        assert!(b.acquired(x, false).unwrap());
        // Both of C's loans settle; D's settles the entry away.
        let mut unlends = Vec::new();
        while let Some(u) = b.poll_unlend() {
            unlends.push(u);
        }
        unlends.sort();
        assert_eq!(unlends, vec![(C, 1), (C, 2)]);
        b.unlend(to_d, D).unwrap();
        assert!(b.is_empty());
    }

    #[test]
    fn freed_slots_get_new_generations() {
        let mut a: Exports<()> = Exports::new(A, Incarnation(1), 100);
        let x = a.export((), false);
        a.note_sent(x.local, B).unwrap();
        a.release(B, x.incarnation, x.local, 1).unwrap().unwrap();
        let y = a.export((), false);
        assert_eq!(x.local.index, y.local.index);
        assert_ne!(x.local.generation, y.local.generation);
        assert!(matches!(
            a.get(x.incarnation, x.local),
            Err(RefError::Stale(_))
        ));
        assert!(matches!(
            a.get(Incarnation(2), y.local),
            Err(RefError::Stale(_))
        ));
        assert!(a.get(y.incarnation, y.local).is_ok());
    }

    #[test]
    fn over_release_and_cap_are_errors() {
        let mut a: Exports<()> = Exports::new(A, Incarnation(1), 1);
        let x = a.export((), true);
        let y = a.export((), true);
        a.note_sent(x.local, B).unwrap();
        assert!(matches!(
            a.note_sent(y.local, B),
            Err(RefError::TooManyRefs { max: 1, .. })
        ));
        assert!(matches!(
            a.release(B, x.incarnation, x.local, 2),
            Err(RefError::OverRelease {
                released: 2,
                held: 1,
                ..
            })
        ));
        // Pinned: stays after the last release.
        assert_eq!(a.release(B, x.incarnation, x.local, 1).unwrap(), None);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn peer_loss_frees_what_only_it_held() {
        let mut a: Exports<()> = Exports::new(A, Incarnation(1), 100);
        let x = a.export((), false);
        let pinned = a.export((), true);
        a.note_sent(x.local, B).unwrap();
        a.note_sent(pinned.local, B).unwrap();
        let freed = a.peer_lost(B);
        assert_eq!(freed, vec![(x, ())]);
        assert_eq!(a.len(), 1);
        assert_eq!(a.held_by(B), 0);
    }
}
