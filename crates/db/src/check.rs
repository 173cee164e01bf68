//! What `check` reads of the metadata and the few repairs it makes: every object with its
//! upload state, refcounts against a count of the mappings, the blocks (and file names) an
//! object holds, and, for `--repair`, refcounts rebuilt from the mappings and store objects
//! that nothing references queued for deletion.

use sqlx::{Connection, Row};

use crate::batch::{json_ints, json_rows};
use crate::{Db, Object, ObjectState, Result, ctx, object_from_row, to_i64, to_u64};

/// One object as `check` compares it with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedObject {
    /// Object id.
    pub id: u64,
    /// Upload state.
    pub state: ObjectState,
    /// Plaintext length.
    pub length: u64,
    /// Bytes in the store, once confirmed.
    pub stored_size: Option<u64>,
}

/// An object whose refcount is not the number of blocks that map to it, or a row that no
/// block maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountMismatch {
    /// Object id.
    pub id: u64,
    /// The refcount recorded.
    pub refcount: u64,
    /// The blocks that map to it.
    pub mappings: u64,
}

/// A block that maps to an object, with the file whose inode holds it (if one does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    /// The object.
    pub obj_id: u64,
    /// The block's inode.
    pub inode: u64,
    /// The block number.
    pub blockno: u64,
    /// The name and size of the file whose inode this is (none for raw block users and for
    /// the namespace's staging and retired inodes).
    pub file: Option<(String, u64)>,
}

/// The most ids bound to one statement (one JSON array).
const CHUNK: usize = 4096;

impl Db {
    /// Every object row, in id order.
    pub async fn check_objects(&self) -> Result<Vec<CheckedObject>> {
        let rows = sqlx::query("SELECT id, state, length, stored_size FROM objects ORDER BY id")
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("list objects"))?;
        rows.iter()
            .map(|row| {
                let get = ctx("decode an object row");
                Ok(CheckedObject {
                    id: to_u64(row.try_get("id").map_err(get)?, "object id")?,
                    state: ObjectState::parse(
                        row.try_get("state").map_err(ctx("decode a state"))?,
                    )?,
                    length: to_u64(
                        row.try_get("length").map_err(ctx("decode a length"))?,
                        "length",
                    )?,
                    stored_size: row
                        .try_get::<Option<i64>, _>("stored_size")
                        .map_err(ctx("decode a stored size"))?
                        .map(|s| to_u64(s, "stored size"))
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Objects whose refcount differs from the number of blocks mapping to them, and rows
    /// that no block maps to (whatever their refcount).
    pub async fn refcount_mismatches(&self) -> Result<Vec<RefcountMismatch>> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(MISMATCHES)
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("compare refcounts with the mappings"))?;
        rows.into_iter().map(mismatch).collect()
    }

    /// The row of object `id`, if there is one.
    pub async fn object(&self, id: u64) -> Result<Option<Object>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            object_columns!(),
            " FROM objects WHERE id = ?"
        ))
        .bind(to_i64(id)?)
        .fetch_optional(&self.readers)
        .await
        .map_err(ctx("look up an object"))?;
        row.as_ref().map(object_from_row).transpose()
    }

    /// The blocks that map to the objects `ids`, with the files they belong to, in object,
    /// inode and block order.
    pub async fn blocks_of_objects(&self, ids: &[u64]) -> Result<Vec<BlockRef>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let ids = json_ints(
                chunk
                    .iter()
                    .map(|&i| to_i64(i))
                    .collect::<Result<Vec<_>>>()?,
            );
            let rows = sqlx::query(
                "SELECT b.obj_id AS obj_id, b.inode AS inode, b.blockno AS blockno, \
                        f.name AS name, f.size AS size \
                 FROM blocks b LEFT JOIN files f ON f.inode = b.inode \
                 WHERE b.obj_id IN (SELECT value FROM json_each(?)) \
                 ORDER BY b.obj_id, b.inode, b.blockno",
            )
            .bind(ids)
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("list the blocks of objects"))?;
            for row in &rows {
                let get = ctx("decode a block row");
                let name: Option<String> = row.try_get("name").map_err(get)?;
                let size: Option<i64> = row.try_get("size").map_err(ctx("decode a file size"))?;
                out.push(BlockRef {
                    obj_id: to_u64(row.try_get("obj_id").map_err(ctx("decode an id"))?, "id")?,
                    inode: to_u64(
                        row.try_get("inode").map_err(ctx("decode an inode"))?,
                        "inode",
                    )?,
                    blockno: to_u64(
                        row.try_get("blockno")
                            .map_err(ctx("decode a block number"))?,
                        "block number",
                    )?,
                    file: match (name, size) {
                        (Some(n), Some(s)) => Some((n, to_u64(s, "file size")?)),
                        _ => None,
                    },
                });
            }
        }
        Ok(out)
    }

    /// The objects that blocks `keys` (pairs of inode and block number) map to, with their
    /// plaintext lengths: `(inode, blockno, obj_id, length)` for those that have a mapping.
    pub async fn block_lengths(&self, keys: &[(u64, u64)]) -> Result<Vec<(u64, u64, u64, u64)>> {
        let mut out = Vec::new();
        for chunk in keys.chunks(CHUNK) {
            let pairs = chunk
                .iter()
                .map(|&(i, b)| Ok([to_i64(i)?, to_i64(b)?]))
                .collect::<Result<Vec<_>>>()?;
            let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
                "WITH k(i, n) AS ( \
                     SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') \
                     FROM json_each(?)) \
                 SELECT b.inode, b.blockno, o.id, o.length FROM k \
                 JOIN blocks b ON b.inode = k.i AND b.blockno = k.n \
                 JOIN objects o ON o.id = b.obj_id",
            )
            .bind(json_rows(pairs))
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("look up the mappings of cached blocks"))?;
            for (i, b, o, l) in rows {
                out.push((
                    to_u64(i, "inode")?,
                    to_u64(b, "block number")?,
                    to_u64(o, "object id")?,
                    to_u64(l, "length")?,
                ));
            }
        }
        Ok(out)
    }

    /// Sets every refcount to the number of blocks mapping to its object, in one
    /// transaction. An object no block maps to is released as by a removal: its row goes
    /// and a pending deletion is recorded. Returns the objects changed (with the refcounts
    /// found) and those released, whose store objects the caller deletes.
    pub async fn rebuild_refcounts(&self) -> Result<(Vec<RefcountMismatch>, Vec<u64>)> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(MISMATCHES)
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("compare refcounts with the mappings"))?;
        let found = rows.into_iter().map(mismatch).collect::<Result<Vec<_>>>()?;
        let released: Vec<u64> = found
            .iter()
            .filter(|m| m.mappings == 0)
            .map(|m| m.id)
            .collect();
        sqlx::query(
            "UPDATE objects SET refcount = \
                 (SELECT count(*) FROM blocks b WHERE b.obj_id = objects.id) \
             WHERE refcount != (SELECT count(*) FROM blocks b WHERE b.obj_id = objects.id) \
               AND EXISTS (SELECT 1 FROM blocks b WHERE b.obj_id = objects.id)",
        )
        .execute(&mut *tx)
        .await
        .map_err(ctx("rebuild refcounts"))?;
        if !released.is_empty() {
            let ids = json_ints(
                released
                    .iter()
                    .map(|&i| to_i64(i))
                    .collect::<Result<Vec<_>>>()?,
            );
            sqlx::query(
                "INSERT OR IGNORE INTO pending_deletions (obj_id) \
                 SELECT value FROM json_each(?)",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(ctx("record pending deletions"))?;
            sqlx::query(
                "DELETE FROM objects WHERE id IN (SELECT value FROM json_each(?)) \
                 AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.obj_id = objects.id)",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(ctx("release unreferenced objects"))?;
        }
        tx.commit().await.map_err(ctx("commit rebuilt refcounts"))?;
        self.synced();
        Ok((found, released))
    }

    /// Records pending deletions of store objects `ids` that no object row names (leaks),
    /// in one transaction; an id that has a row (or a pending deletion already) is left
    /// alone. Returns the ids recorded, whose store objects the caller deletes.
    pub async fn queue_deletions(&self, ids: &[u64]) -> Result<Vec<u64>> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let mut recorded = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let ids = json_ints(
                chunk
                    .iter()
                    .map(|&i| to_i64(i))
                    .collect::<Result<Vec<_>>>()?,
            );
            let rows: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO pending_deletions (obj_id) \
                 SELECT value FROM json_each(?) j WHERE \
                     NOT EXISTS (SELECT 1 FROM objects o WHERE o.id = j.value) \
                     AND NOT EXISTS (SELECT 1 FROM pending_deletions p WHERE p.obj_id = j.value) \
                 RETURNING obj_id",
            )
            .bind(ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("record deletions of leaked objects"))?;
            for id in rows {
                recorded.push(to_u64(id, "object id")?);
            }
        }
        tx.commit()
            .await
            .map_err(ctx("commit deletions of leaked objects"))?;
        self.synced();
        Ok(recorded)
    }

    /// Records that object `id` takes `stored_size` bytes in the store (after it was
    /// uploaded again).
    pub async fn set_stored_size(&self, id: u64, stored_size: u64) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE objects SET stored_size = ? WHERE id = ? AND state = 'uploaded'")
            .bind(to_i64(stored_size)?)
            .bind(to_i64(id)?)
            .execute(&mut *w)
            .await
            .map_err(ctx("record the stored size of an object"))?;
        self.synced();
        Ok(())
    }
}

/// Objects whose refcount differs from their mappings, and rows no block maps to (a row is
/// deleted when its last mapping goes): `(id, refcount, mappings)`.
const MISMATCHES: &str = "SELECT o.id, o.refcount, \
        (SELECT count(*) FROM blocks b WHERE b.obj_id = o.id) AS n \
     FROM objects o \
     WHERE o.refcount != (SELECT count(*) FROM blocks b WHERE b.obj_id = o.id) \
        OR NOT EXISTS (SELECT 1 FROM blocks b WHERE b.obj_id = o.id) \
     ORDER BY o.id";

fn mismatch((id, refcount, mappings): (i64, i64, i64)) -> Result<RefcountMismatch> {
    Ok(RefcountMismatch {
        id: to_u64(id, "object id")?,
        refcount: to_u64(refcount, "refcount")?,
        mappings: to_u64(mappings, "mapping count")?,
    })
}
