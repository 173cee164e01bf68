//! [`FileReader`]: reads of one version of a file, which it keeps alive.

use std::sync::Arc;

use bytes::Bytes;

use super::FileMeta;
use super::shared::{PinGuard, Shared};
use crate::Result;

/// A file opened for reading; keeps the content it opened alive.
#[derive(Debug)]
pub struct FileReader {
    shared: Arc<Shared>,
    meta: FileMeta,
    _pin: PinGuard,
}

impl FileReader {
    pub(super) fn new(shared: Arc<Shared>, meta: FileMeta, pin: PinGuard) -> Self {
        Self {
            shared,
            meta,
            _pin: pin,
        }
    }

    /// The file as opened.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file, as opened).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.shared
            .read(self.meta.inode, self.meta.size, offset, len)
            .await
    }

    /// The volume's block size: reads of whole aligned blocks are served without copies.
    pub fn block_size(&self) -> u64 {
        self.shared.block_size()
    }
}
