//! The file namespace: names, their inodes, sizes and versions, and inodes whose blocks
//! still have to be removed.

use sqlx::{Connection, Row};

use crate::{Db, Error, Result, ctx, to_i64, to_u64};

/// One row of `files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    /// The file's name.
    pub name: String,
    /// The inode holding its blocks.
    pub inode: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Bumped on every change of the content.
    pub version: u64,
    /// Attributes of the content, set by the writer that named the file (opaque text);
    /// cleared by a patch or a truncation.
    pub attrs: Option<String>,
}

fn file_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<FileRow> {
    let get = |e| Error::Sqlx {
        context: "decode a file row",
        source: e,
    };
    Ok(FileRow {
        name: row.try_get("name").map_err(get)?,
        inode: to_u64(row.try_get("inode").map_err(get)?, "inode")?,
        size: to_u64(row.try_get("size").map_err(get)?, "file size")?,
        mtime_ns: row.try_get("mtime_ns").map_err(get)?,
        version: to_u64(row.try_get("version").map_err(get)?, "version")?,
        attrs: row.try_get("attrs").map_err(get)?,
    })
}

/// A patch or truncation committed but perhaps not yet merged into its file's inode (see
/// [`Db::commit_merge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeRow {
    /// The staging inode holding the changed blocks.
    pub staging: u64,
    /// The file's inode, which receives them.
    pub target: u64,
    /// The byte of `target` from which its content is removed (before the staged blocks are
    /// copied in).
    pub cut: u64,
    /// The file's version that the change made.
    pub version: u64,
}

/// The columns of `files` that [`file_from_row`] reads (a macro for `concat!`, as in
/// `object_columns!`).
macro_rules! file_columns {
    () => {
        "name, inode, size, mtime_ns, version, attrs"
    };
}

impl Db {
    /// The file called `name`, if any.
    pub async fn file(&self, name: &str) -> Result<Option<FileRow>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            file_columns!(),
            " FROM files WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.readers)
        .await
        .map_err(ctx("look up a file"))?;
        row.as_ref().map(file_from_row).transpose()
    }

    /// Allocates `n` new inodes in state `staging` in one durable transaction (one sync for
    /// all of them): a writer takes one each, and those never taken are staging inodes like
    /// any abandoned one, removed by the next open or by [`Db::forget_staging_inodes`].
    pub async fn create_staging_inodes(&self, n: u64) -> Result<Vec<u64>> {
        let mut w = self.write().await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "WITH RECURSIVE k(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM k WHERE x < ?) \
             INSERT INTO inodes (state) SELECT 'staging' FROM k RETURNING inode",
        )
        .bind(to_i64(n)?)
        .fetch_all(&mut *w)
        .await
        .map_err(ctx("allocate inodes"))?;
        let mut ids = ids
            .into_iter()
            .map(|i| to_u64(i, "inode"))
            .collect::<Result<Vec<_>>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Forgets staging inodes that were never written (allocated ahead and not used), in one
    /// transaction. Inodes that have blocks, or are no longer staging, are left alone.
    pub async fn forget_staging_inodes(&self, inodes: &[u64]) -> Result<()> {
        self.delete_inodes(
            inodes,
            "DELETE FROM inodes WHERE state = 'staging' \
             AND inode IN (SELECT value FROM json_each(?)) \
             AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.inode = inodes.inode)",
            "forget unused inodes",
        )
        .await
    }

    /// Runs `sql`, a deletion from `inodes` whose one parameter is a JSON array of
    /// `inodes`, in one transaction.
    async fn delete_inodes(
        &self,
        inodes: &[u64],
        sql: &'static str,
        action: &'static str,
    ) -> Result<()> {
        let list = crate::batch::json_ints(
            inodes
                .iter()
                .map(|&i| to_i64(i))
                .collect::<Result<Vec<_>>>()?,
        );
        let mut w = self.write().await?;
        sqlx::query(sql)
            .bind(list)
            .execute(&mut *w)
            .await
            .map_err(ctx(action))?;
        Ok(())
    }

    /// Names the staging inode `inode` `name` with `size` and `attrs`, in one transaction.
    /// The inode the name had before, if any, is retired and returned; with `only_if_free`,
    /// a name that is taken is refused ([`Error::NameTaken`]) and nothing changes.
    pub async fn replace_file(
        &self,
        name: &str,
        inode: u64,
        size: u64,
        mtime_ns: i64,
        attrs: Option<&str>,
        only_if_free: bool,
    ) -> Result<(FileRow, Option<u64>)> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let old = sqlx::query("SELECT inode, version FROM files WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(ctx("look up a file"))?;
        let (old_inode, version) = match old {
            Some(row) => {
                let i: i64 = row.try_get("inode").map_err(ctx("decode a file row"))?;
                let v: i64 = row.try_get("version").map_err(ctx("decode a file row"))?;
                (Some(i), v + 1)
            }
            None => (None, 1),
        };
        if only_if_free && old_inode.is_some() {
            return Err(Error::NameTaken(name.to_owned()));
        }
        let staged =
            sqlx::query("UPDATE inodes SET state = 'live' WHERE inode = ? AND state = 'staging'")
                .bind(to_i64(inode)?)
                .execute(&mut *tx)
                .await
                .map_err(ctx("name an inode"))?;
        if staged.rows_affected() != 1 {
            return Err(Error::Invalid(format!("inode {inode} is not being staged")));
        }
        if let Some(old) = old_inode {
            sqlx::query("UPDATE inodes SET state = 'retired' WHERE inode = ?")
                .bind(old)
                .execute(&mut *tx)
                .await
                .map_err(ctx("retire an inode"))?;
        }
        let row = sqlx::query(concat!(
            "INSERT INTO files (name, inode, size, mtime_ns, version, attrs) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET inode = excluded.inode, size = excluded.size, \
             mtime_ns = excluded.mtime_ns, version = excluded.version, attrs = excluded.attrs \
             RETURNING ",
            file_columns!()
        ))
        .bind(name)
        .bind(to_i64(inode)?)
        .bind(to_i64(size)?)
        .bind(mtime_ns)
        .bind(version)
        .bind(attrs)
        .fetch_one(&mut *tx)
        .await
        .map_err(ctx("name a file"))?;
        let row = file_from_row(&row)?;
        tx.commit()
            .await
            .map_err(ctx("commit a file replacement"))?;
        Ok((row, old_inode.map(|i| to_u64(i, "inode")).transpose()?))
    }

    /// Sets the size of file `name` if it still uses `inode`, bumping its version and
    /// clearing its attributes (they described the content before). Returns
    /// the new row, or `None` if the name is gone or uses another inode.
    pub async fn update_file(
        &self,
        name: &str,
        inode: u64,
        size: u64,
        mtime_ns: i64,
    ) -> Result<Option<FileRow>> {
        let mut w = self.write().await?;
        let row = sqlx::query(concat!(
            "UPDATE files SET size = ?, mtime_ns = ?, version = version + 1, attrs = NULL \
             WHERE name = ? AND inode = ? RETURNING ",
            file_columns!()
        ))
        .bind(to_i64(size)?)
        .bind(mtime_ns)
        .bind(name)
        .bind(to_i64(inode)?)
        .fetch_optional(&mut *w)
        .await
        .map_err(ctx("update a file"))?;
        row.as_ref().map(file_from_row).transpose()
    }

    /// The commit point of a patch or truncation of `name`: sets its size and mtime, bumps
    /// its version and clears its attributes if it still uses inode `target`, and records that the blocks staged in
    /// `staging` are to be merged into `target` (its bytes from `cut` on removed first), in
    /// one transaction. Returns the new row, or `None` (and changes nothing) if
    /// the name is gone or uses another inode. `staging` must be a staging inode.
    pub async fn commit_merge(
        &self,
        name: &str,
        target: u64,
        staging: u64,
        size: u64,
        mtime_ns: i64,
        cut: u64,
    ) -> Result<Option<FileRow>> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let row = sqlx::query(concat!(
            "UPDATE files SET size = ?, mtime_ns = ?, version = version + 1, attrs = NULL \
             WHERE name = ? AND inode = ? RETURNING ",
            file_columns!()
        ))
        .bind(to_i64(size)?)
        .bind(mtime_ns)
        .bind(name)
        .bind(to_i64(target)?)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ctx("update a file"))?;
        let Some(row) = row.as_ref().map(file_from_row).transpose()? else {
            return Ok(None);
        };
        let staged = sqlx::query(
            "INSERT INTO merges (staging, target, cut, version) \
             SELECT inode, ?, ?, ? FROM inodes WHERE inode = ? AND state = 'staging'",
        )
        .bind(to_i64(target)?)
        .bind(to_i64(cut)?)
        .bind(to_i64(row.version)?)
        .bind(to_i64(staging)?)
        .execute(&mut *tx)
        .await
        .map_err(ctx("record a merge"))?;
        if staged.rows_affected() != 1 {
            return Err(Error::Invalid(format!(
                "inode {staging} is not being staged"
            )));
        }
        tx.commit().await.map_err(ctx("commit a file change"))?;
        Ok(Some(row))
    }

    /// Merges committed by [`Db::commit_merge`] and not yet finished, oldest first.
    pub async fn pending_merges(&self) -> Result<Vec<MergeRow>> {
        let rows = sqlx::query("SELECT staging, target, cut, version FROM merges ORDER BY staging")
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("list pending merges"))?;
        rows.iter()
            .map(|r| {
                let get = |c: &'static str| -> Result<u64> {
                    to_u64(r.try_get(c).map_err(ctx("decode a merge row"))?, c)
                };
                Ok(MergeRow {
                    staging: get("staging")?,
                    target: get("target")?,
                    cut: get("cut")?,
                    version: get("version")?,
                })
            })
            .collect()
    }

    /// Records that the merge of `staging` is done and retires the staging inode (its blocks
    /// are to be removed), in one transaction.
    pub async fn finish_merge(&self, staging: u64) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        sqlx::query("DELETE FROM merges WHERE staging = ?")
            .bind(to_i64(staging)?)
            .execute(&mut *tx)
            .await
            .map_err(ctx("finish a merge"))?;
        sqlx::query("UPDATE inodes SET state = 'retired' WHERE inode = ? AND state = 'staging'")
            .bind(to_i64(staging)?)
            .execute(&mut *tx)
            .await
            .map_err(ctx("retire an inode"))?;
        tx.commit()
            .await
            .map_err(ctx("commit the end of a merge"))?;
        Ok(())
    }

    /// The file whose content is the blocks of `inode`, if any.
    pub async fn file_of_inode(&self, inode: u64) -> Result<Option<FileRow>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            file_columns!(),
            " FROM files WHERE inode = ?"
        ))
        .bind(to_i64(inode)?)
        .fetch_optional(&self.readers)
        .await
        .map_err(ctx("look up a file by inode"))?;
        row.as_ref().map(file_from_row).transpose()
    }

    /// Deletes file `name` and retires its inode, in one transaction. Returns the row.
    pub async fn delete_file(&self, name: &str) -> Result<Option<FileRow>> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let row = sqlx::query(concat!(
            "DELETE FROM files WHERE name = ? RETURNING ",
            file_columns!()
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ctx("delete a file"))?;
        let row = row.as_ref().map(file_from_row).transpose()?;
        if let Some(r) = &row {
            sqlx::query("UPDATE inodes SET state = 'retired' WHERE inode = ?")
                .bind(to_i64(r.inode)?)
                .execute(&mut *tx)
                .await
                .map_err(ctx("retire an inode"))?;
        }
        tx.commit().await.map_err(ctx("commit a file deletion"))?;
        Ok(row)
    }

    /// Files whose names start with `prefix` and sort after `after`, in name order, at most
    /// `limit`.
    pub async fn list_files(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<FileRow>> {
        // Names with a common prefix are contiguous in name order: start at the prefix (or
        // after the cursor) and stop at the first name without it.
        let (sql, start) = match after {
            Some(after) if after >= prefix => (
                concat!(
                    "SELECT ",
                    file_columns!(),
                    " FROM files WHERE name > ? ORDER BY name LIMIT ?"
                ),
                after,
            ),
            _ => (
                concat!(
                    "SELECT ",
                    file_columns!(),
                    " FROM files WHERE name >= ? ORDER BY name LIMIT ?"
                ),
                prefix,
            ),
        };
        let rows = sqlx::query(sql)
            .bind(start)
            .bind(i64::from(limit))
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("list files"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let f = file_from_row(row)?;
            if !f.name.starts_with(prefix) {
                break;
            }
            out.push(f);
        }
        Ok(out)
    }

    /// Inodes whose blocks have to be removed: retired ones, and staging ones that no merge
    /// waits for (only meaningful at open, when no change is in progress).
    pub async fn inodes_to_clean(&self) -> Result<Vec<u64>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT inode FROM inodes WHERE state IN ('staging', 'retired') \
             AND inode NOT IN (SELECT staging FROM merges) ORDER BY inode",
        )
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("list inodes to clean"))?;
        ids.into_iter().map(|i| to_u64(i, "inode")).collect()
    }

    /// Retires a staging inode whose replacement was abandoned.
    pub async fn retire_inode(&self, inode: u64) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("UPDATE inodes SET state = 'retired' WHERE inode = ? AND state = 'staging'")
            .bind(to_i64(inode)?)
            .execute(&mut *w)
            .await
            .map_err(ctx("retire an inode"))?;
        Ok(())
    }

    /// Forgets retired inodes whose blocks are gone, in one transaction.
    pub async fn forget_inodes(&self, inodes: &[u64]) -> Result<()> {
        self.delete_inodes(
            inodes,
            "DELETE FROM inodes WHERE state = 'retired' \
             AND inode IN (SELECT value FROM json_each(?))",
            "forget inodes",
        )
        .await
    }

    /// Forgets a retired inode whose blocks are gone.
    pub async fn forget_inode(&self, inode: u64) -> Result<()> {
        let mut w = self.write().await?;
        sqlx::query("DELETE FROM inodes WHERE inode = ? AND state = 'retired'")
            .bind(to_i64(inode)?)
            .execute(&mut *w)
            .await
            .map_err(ctx("forget an inode"))?;
        Ok(())
    }

    /// For the blocks of `inode`: how many are mapped, and how many of those point to an
    /// object confirmed in the store.
    pub async fn inode_store_state(&self, inode: u64) -> Result<(u64, u64)> {
        let row = sqlx::query(
            "SELECT count(*) AS mapped, \
             coalesce(sum(CASE WHEN o.state = 'uploaded' THEN 1 ELSE 0 END), 0) AS uploaded \
             FROM blocks b JOIN objects o ON o.id = b.obj_id WHERE b.inode = ?",
        )
        .bind(to_i64(inode)?)
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("count the blocks of an inode"))?;
        let mapped: i64 = row.try_get("mapped").map_err(ctx("decode block counts"))?;
        let uploaded: i64 = row
            .try_get("uploaded")
            .map_err(ctx("decode block counts"))?;
        Ok((to_u64(mapped, "count")?, to_u64(uploaded, "count")?))
    }
}
