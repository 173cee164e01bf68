//! The address of a block.

/// The address of a block: an inode and a block number within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockKey {
    /// Inode (file) number.
    pub inode: u64,
    /// Block number within the inode.
    pub blockno: u64,
}

impl BlockKey {
    /// A key.
    pub fn new(inode: u64, blockno: u64) -> Self {
        Self { inode, blockno }
    }

    /// Checks that both numbers fit the metadata (at most `i64::MAX`).
    pub(crate) fn check(self) -> crate::Result<Self> {
        if self.inode > i64::MAX as u64 || self.blockno > i64::MAX as u64 {
            return Err(crate::Error::InvalidKey {
                inode: self.inode,
                blockno: self.blockno,
            });
        }
        Ok(self)
    }
}
