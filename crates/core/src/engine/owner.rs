//! Who owns an inode: the file namespace or the raw users of the block API.
//!
//! The namespace allocates its inodes from the `inodes` table, starting at a floor recorded
//! when a namespace first opens the volume, above every inode in use then (cached or
//! mapped). From then on the namespace owns every inode from the floor up, and raw block
//! access ([`crate::BlockCache::block`] and the calls built on it) is refused there; below
//! it, raw inodes keep working. Without a namespace, every inode is the raw users'. So the
//! two never hand out or accept the same inode, whichever order they come in.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::{Error, Result};

/// The floor while no namespace owns any inode.
pub(super) const NO_NAMESPACE: u64 = u64::MAX;

impl Inner {
    /// Loads the floor recorded in the database (at open).
    pub(crate) async fn load_namespace_floor(&self) -> Result<()> {
        let floor = self.db.namespace_floor().await?.unwrap_or(NO_NAMESPACE);
        self.namespace_floor.store(floor, Ordering::SeqCst);
        Ok(())
    }

    /// Refuses raw block access to an inode the namespace owns. Called with the block's lock
    /// held (or before a removal), so that [`Inner::claim_namespace_inodes`] sees every raw
    /// block that passed.
    pub(crate) fn check_raw(&self, inode: u64) -> Result<()> {
        let first = self.namespace_floor.load(Ordering::SeqCst);
        if first != NO_NAMESPACE && inode >= first {
            return Err(Error::NamespaceInode { inode, first });
        }
        Ok(())
    }

    /// Gives the namespace its inodes (once per volume): above every inode cached, locked or
    /// mapped now. Raw access is refused while this runs, so none can slip in between.
    pub(crate) async fn claim_namespace_inodes(self: &Arc<Self>) -> Result<()> {
        if self.namespace_floor.load(Ordering::SeqCst) != NO_NAMESPACE {
            return Ok(());
        }
        self.namespace_floor.store(0, Ordering::SeqCst);
        let cached = self.lock_state().keys().into_iter();
        let locked = self.locks.keys().into_iter();
        let above = cached
            .chain(locked)
            .map(|k| k.inode.saturating_add(1))
            .max()
            .unwrap_or(1);
        let claimed = self.db.claim_namespace_inodes(above).await;
        let floor = match &claimed {
            Ok(floor) => *floor,
            Err(_) => NO_NAMESPACE,
        };
        self.namespace_floor.store(floor, Ordering::SeqCst);
        claimed?;
        Ok(())
    }
}
