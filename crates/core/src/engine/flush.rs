//! Flush: commit what is dirty and wait until the store holds it.

use std::sync::Arc;

use super::Inner;
use super::commit::LockMode;
use super::state::{FlushStatus, Target};
use super::upload::wait_done;
use crate::error::UploadFailure;
use crate::{BlockKey, Error, Result};

/// A commit a flush waits for.
struct Wait {
    key: BlockKey,
    /// Whether it covers the generation the flush must see.
    covers: bool,
    /// Whether this flush did not start it (its failure is not the flush's: the next round
    /// commits the block again).
    inherited: bool,
    done: super::state::Done,
}

impl Inner {
    /// Commit + wait: returns once every block dirty at the call (all, or those of one
    /// inode) is in the store, and, for a flush of all blocks, once the metadata is shipped
    /// (the store alone then restores every file written before the call) and the store
    /// deletions queued before the call are done (but those of objects that the shipped
    /// metadata still names: see `ship`). Cancel-safe: the commits it started finish on
    /// their own.
    pub(crate) async fn flush(self: &Arc<Self>, only: Option<u64>) -> Result<()> {
        let removals = only.is_none().then(|| {
            self.removals.retry_now();
            self.removals.mark()
        });
        let targets = self.lock_state().flush_targets(only);
        self.flush_targets(targets).await?;
        match removals {
            Some(mark) => {
                self.ship_metadata().await?;
                // Files changed while this flush ran did not ship (their new blocks were
                // dirty), and the store may hold no version of one written before it: upload
                // what is dirty now and ship again, a few times at most.
                for _ in 0..3 {
                    if self.deferred_at_last_round() == 0 {
                        break;
                    }
                    let targets = self.lock_state().flush_targets(None);
                    self.flush_targets(targets).await?;
                    self.ship_metadata().await?;
                }
                // Deletions held back for what this round shipped go now.
                self.retry_held_removals().await?;
                self.removals.retry_now();
                self.removals.wait(mark).await
            }
            None => Ok(()),
        }
    }

    /// [`Inner::flush`] of the blocks of `inodes`, together.
    pub(crate) async fn flush_inodes(self: &Arc<Self>, inodes: &[u64]) -> Result<()> {
        let mut targets = std::collections::HashMap::new();
        {
            let st = self.lock_state();
            for &inode in inodes {
                targets.extend(st.flush_targets(Some(inode)));
            }
        }
        self.flush_targets(targets).await
    }

    /// [`Inner::flush`] of blocks `blocks` of `inode` only.
    pub(crate) async fn flush_blocks(self: &Arc<Self>, inode: u64, blocks: &[u64]) -> Result<()> {
        let mut targets = self.lock_state().flush_targets(Some(inode));
        let wanted: std::collections::HashSet<u64> = blocks.iter().copied().collect();
        targets.retain(|k, _| wanted.contains(&k.blockno));
        self.flush_targets(targets).await
    }

    async fn flush_targets(
        self: &Arc<Self>,
        targets: std::collections::HashMap<BlockKey, Target>,
    ) -> Result<()> {
        // A flush is work a user asked for: a store that is down is tried again at once,
        // and a lease that lapsed meanwhile is taken again.
        self.backend.retry_now();
        self.backend.renew_lease_if_lapsed().await;
        loop {
            let mut to_commit = Vec::new();
            let mut waits = Vec::new();
            {
                let st = self.lock_state();
                for (&key, &target) in &targets {
                    match st.flush_status(key, target) {
                        FlushStatus::Done => {}
                        FlushStatus::InFlight { generation, done } => waits.push(Wait {
                            key,
                            covers: generation >= target.generation,
                            inherited: true,
                            done,
                        }),
                        FlushStatus::Idle => to_commit.push(key),
                    }
                }
            }
            if to_commit.is_empty() && waits.is_empty() {
                return Ok(());
            }
            for p in self.commit_keys(to_commit, LockMode::Wait).await? {
                let wanted = targets.get(&p.key).map_or(0, |t: &Target| t.generation);
                waits.push(Wait {
                    key: p.key,
                    covers: p.generation >= wanted,
                    inherited: false,
                    done: p.done,
                });
            }
            for w in waits {
                let Err(error) = wait_done(w.done).await else {
                    continue;
                };
                if !w.covers || w.inherited {
                    continue;
                }
                // Blocks removed meanwhile need no flush; an upload whose object was released
                // by a newer commit leaves the block dirty, and the next round commits it.
                let removed = targets
                    .get(&w.key)
                    .is_none_or(|t| self.lock_state().is_gone(w.key, t.entry_id));
                let released = matches!(&error, Error::Upload { source, .. } if matches!(**source, UploadFailure::NotRecorded));
                if !removed && !released {
                    return Err(error);
                }
            }
        }
    }
}
