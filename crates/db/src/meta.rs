//! The volume's metadata as it is shipped to the store, and rebuilt from it.
//!
//! Triggers (migration 5) note every changed key of `files`, `blocks` and `merges` in
//! `meta_changes`. A delta reads the current rows of the noted keys ([`Db::read_delta`]);
//! a snapshot reads every row that a restore needs ([`Db::snapshot_reader`]). Once the store
//! holds them, [`Db::meta_shipped`] forgets the keys (a key changed again meanwhile stays
//! noted). Store deletions of released objects wait for [`Db::meta_watermark`] to pass the
//! release, so that the metadata in the store never names an object that is gone.
//!
//! A restore stages the rows of a generation in `restore_*` tables ([`Db::restore_apply`],
//! snapshot parts then deltas in order) and builds the volume's tables from them in one
//! transaction ([`Db::restore_finish`]).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sqlx::Connection;

use crate::batch::{json_ints, json_rows};
use crate::{Db, Error, Result, ctx, to_i64, to_u64};

/// A key noted as changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChangeKey {
    /// The file of this name.
    File(String),
    /// One block mapping.
    Block {
        /// Its inode.
        inode: u64,
        /// Its block number.
        blockno: u64,
    },
    /// Every block of an inode (it became a file's, or a merge's staging inode).
    Inode(u64),
    /// The merge of a staging inode into a file's inode.
    Merge {
        /// The staging inode.
        staging: u64,
        /// The file's inode.
        target: u64,
    },
}

impl ChangeKey {
    fn columns(&self) -> Result<(i64, i64, i64, &str)> {
        Ok(match self {
            Self::File(name) => (1, 0, 0, name.as_str()),
            Self::Block { inode, blockno } => (2, to_i64(*inode)?, to_i64(*blockno)?, ""),
            Self::Inode(inode) => (3, to_i64(*inode)?, 0, ""),
            Self::Merge { staging, target } => (4, to_i64(*staging)?, to_i64(*target)?, ""),
        })
    }

    fn from_columns(kind: i64, a: i64, b: i64, name: String) -> Result<Self> {
        Ok(match kind {
            1 => Self::File(name),
            2 => Self::Block {
                inode: to_u64(a, "inode")?,
                blockno: to_u64(b, "block number")?,
            },
            3 => Self::Inode(to_u64(a, "inode")?),
            4 => Self::Merge {
                staging: to_u64(a, "inode")?,
                target: to_u64(b, "inode")?,
            },
            k => return Err(Error::Invalid(format!("metadata change of kind {k}"))),
        })
    }
}

/// A noted change: the key, and the change clock at its first and latest unshipped change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What changed.
    pub key: ChangeKey,
    /// The clock at the first change not yet shipped.
    pub seq: u64,
    /// The clock at the latest change.
    pub last: u64,
}

/// A file as shipped: name, inode, size, mtime (ns), version.
pub type ShippedFile = (String, u64, u64, i64, u64);
/// A block mapping as shipped: inode, block number, object id.
pub type ShippedBlock = (u64, u64, u64);
/// An object as shipped: id, SHA-256 (hex; none for an object nothing may dedup against),
/// plaintext length, stored size.
pub type ShippedObject = (u64, Option<String>, u64, Option<u64>);
/// A merge as shipped: staging inode, the file's inode, cut, version.
pub type ShippedMerge = (u64, u64, u64, u64);

/// Rows of the metadata, as a snapshot part or a delta carries them. In a delta, a `dead_*`
/// entry says the row is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRows {
    /// Files (a delta: their current rows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ShippedFile>,
    /// Names of files that are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_files: Vec<String>,
    /// Block mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<ShippedBlock>,
    /// Block mappings that are gone (inode, block number).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_blocks: Vec<(u64, u64)>,
    /// The objects the block mappings name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ShippedObject>,
    /// Merges not yet finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merges: Vec<ShippedMerge>,
    /// Staging inodes whose merge is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_merges: Vec<u64>,
    /// The attributes of files of `files` that have some (name, attributes); the others
    /// have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_attrs: Vec<(String, String)>,
}

impl MetaRows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.files.len()
            + self.dead_files.len()
            + self.blocks.len()
            + self.dead_blocks.len()
            + self.objects.len()
            + self.merges.len()
            + self.dead_merges.len()
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an inode is, in the state a delta was read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InodeRole {
    /// A file's inode.
    Live,
    /// The staging inode of a merge into `target`.
    Staging {
        /// The file's inode.
        target: u64,
    },
    /// Neither: being written, or retired. Its blocks are not part of the shipped state.
    Other,
}

/// An object as a delta read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The shipped form.
    pub row: ShippedObject,
    /// Whether its upload is confirmed.
    pub uploaded: bool,
}

/// The noted changes up to `through` and the current rows of their keys, read in one
/// snapshot of the database.
#[derive(Debug, Default)]
pub struct DeltaRead {
    /// Every change with `seq <= through` is here; their rows are as of a state that may be
    /// newer (a key with `last > through` changed again since).
    pub through: u64,
    /// The changes.
    pub changes: Vec<Change>,
    /// Current rows of the files noted (`None`: gone).
    pub files: HashMap<String, Option<ShippedFile>>,
    /// The attributes of the files noted that have some.
    pub file_attrs: HashMap<String, String>,
    /// Current mappings of the blocks noted (`None`: gone), but those of inodes noted whole:
    /// theirs are in `whole` (a block noted there and not in `whole` is gone).
    pub blocks: HashMap<(u64, u64), Option<u64>>,
    /// Every mapping of the inodes noted whole, by block number: (block number, object id).
    pub whole: HashMap<u64, Vec<(u64, u64)>>,
    /// Current rows of the merges noted, by staging inode (`None`: gone).
    pub merges: HashMap<u64, Option<ShippedMerge>>,
    /// What each inode named by a change is.
    pub roles: HashMap<u64, InodeRole>,
    /// The objects named by the mappings read.
    pub objects: HashMap<u64, ObjectInfo>,
}

/// A file looked up by name: name, then inode, size, mtime, version and attributes if it
/// exists.
type FileLookup = (
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);
/// A merge looked up by staging inode: staging, then target, cut and version if it exists.
type MergeLookup = (i64, Option<i64>, Option<i64>, Option<i64>);
/// A shipped mapping with its object: inode, blockno, object id, hash, length, stored size.
type SnapshotBlock = (i64, i64, i64, Option<Vec<u8>>, Option<i64>, Option<i64>);

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return Err(Error::Invalid(format!("hash {s:?} is not hexadecimal")));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16)
                .map_err(|_| Error::Invalid(format!("hash {s:?} is not hexadecimal")))
        })
        .collect()
}

/// An object as [`OBJECTS_AS_JSON`] lists it: id, hash in hex, length, stored size,
/// whether its upload is confirmed (0 or 1).
type ObjectJson = (i64, Option<String>, i64, Option<i64>, u8);

/// The objects whose ids are the JSON array `?1`, as one JSON array of [`ObjectJson`]: rows
/// of a large delta cost a trip through the database driver each, which dominated reading
/// it (and so a flush of many small blocks). At most [`AGGREGATE_ROWS`] ids at a time.
const OBJECTS_AS_JSON: &str = "SELECT json_group_array(json_array(id, \
            iif(hash IS NULL, NULL, lower(hex(hash))), length, stored_size, state = 'uploaded')) \
     FROM objects WHERE id IN (SELECT value FROM json_each(?1))";

/// Most rows gathered into one JSON aggregate: SQLite refuses strings past its length limit
/// (1e9 bytes by default), which a round naming millions of objects would pass; an object
/// takes about 100 bytes of it, a block mapping about 25.
pub(crate) const AGGREGATE_ROWS: usize = 1 << 16;

fn object_info((id, hash, length, stored, uploaded): ObjectJson) -> Result<(u64, ObjectInfo)> {
    let id = to_u64(id, "object id")?;
    Ok((
        id,
        ObjectInfo {
            row: (
                id,
                hash,
                to_u64(length, "length")?,
                stored.map(|s| to_u64(s, "stored size")).transpose()?,
            ),
            uploaded: uploaded == 1,
        },
    ))
}

/// Parses a JSON aggregate that SQLite built.
fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

/// Shipping the metadata.
impl Db {
    /// Reads the oldest noted changes (at most about `limit`, all those sharing the clock
    /// value of the last one taken) and the current rows of their keys, in one snapshot.
    pub async fn read_delta(&self, limit: usize) -> Result<DeltaRead> {
        let mut conn = self
            .readers
            .acquire()
            .await
            .map_err(ctx("take a reader connection"))?;
        let mut tx = conn.begin().await.map_err(ctx("begin a transaction"))?;
        let clock: i64 = sqlx::query_scalar("SELECT n FROM meta_clock WHERE id = 0")
            .fetch_one(&mut *tx)
            .await
            .map_err(ctx("read the change clock"))?;
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        // Past `limit` changes, stop before the clock value of the first one left out.
        let cut: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM meta_changes ORDER BY seq LIMIT 1 OFFSET ?")
                .bind(limit)
                .fetch_optional(&mut *tx)
                .await
                .map_err(ctx("read the noted changes"))?;
        let through = match cut {
            Some(c) => {
                let first: i64 = sqlx::query_scalar("SELECT min(seq) FROM meta_changes")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(ctx("read the noted changes"))?;
                // Changes stamped alike come from one trigger: never split them.
                if c > first { c - 1 } else { c }
            }
            None => clock,
        };
        let rows: Vec<(i64, i64, i64, String, i64, i64)> = sqlx::query_as(
            "SELECT kind, a, b, name, seq, last FROM meta_changes WHERE seq <= ? ORDER BY seq",
        )
        .bind(through)
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("read the noted changes"))?;
        let mut read = DeltaRead {
            through: to_u64(through, "change clock")?,
            ..DeltaRead::default()
        };
        let mut names = Vec::new();
        let mut blocks = Vec::new();
        let mut whole = Vec::new();
        let mut merges = Vec::new();
        let mut inodes: HashSet<i64> = HashSet::new();
        for (kind, a, b, name, seq, last) in rows {
            let key = ChangeKey::from_columns(kind, a, b, name)?;
            match &key {
                ChangeKey::File(n) => names.push(n.clone()),
                ChangeKey::Block { .. } => {
                    blocks.push([a, b]);
                    inodes.insert(a);
                }
                ChangeKey::Inode(_) => {
                    whole.push(a);
                    inodes.insert(a);
                }
                ChangeKey::Merge { .. } => {
                    merges.push(a);
                    inodes.insert(a);
                    inodes.insert(b);
                }
            }
            read.changes.push(Change {
                key,
                seq: to_u64(seq, "change clock")?,
                last: to_u64(last, "change clock")?,
            });
        }
        // A block of an inode noted whole is read with the whole inode (in this transaction,
        // so as of the same state): not looked up on its own too.
        let noted_whole: HashSet<i64> = whole.iter().copied().collect();
        blocks.retain(|[inode, _]| !noted_whole.contains(inode));
        let mut objects: HashSet<i64> = HashSet::new();
        if !names.is_empty() {
            let list = serde_json::to_string(&names).expect("names serialize");
            let found: Vec<FileLookup> = sqlx::query_as(
                "SELECT j.value, f.inode, f.size, f.mtime_ns, f.version, f.attrs \
                     FROM json_each(?1) AS j LEFT JOIN files f ON f.name = j.value",
            )
            .bind(list)
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("read the files noted"))?;
            for (name, inode, size, mtime, version, attrs) in found {
                let row = match (inode, size, mtime, version) {
                    (Some(i), Some(s), Some(m), Some(v)) => {
                        inodes.insert(i);
                        if let Some(a) = attrs {
                            read.file_attrs.insert(name.clone(), a);
                        }
                        Some((
                            name.clone(),
                            to_u64(i, "inode")?,
                            to_u64(s, "size")?,
                            m,
                            to_u64(v, "version")?,
                        ))
                    }
                    _ => None,
                };
                read.files.insert(name, row);
            }
        }
        if !blocks.is_empty() {
            let found: Vec<(i64, i64, Option<i64>)> = sqlx::query_as(
                "SELECT j.value ->> 0, j.value ->> 1, b.obj_id FROM jsonb_each(?1) AS j \
                 LEFT JOIN blocks b ON b.inode = (j.value ->> 0) AND b.blockno = (j.value ->> 1)",
            )
            .bind(json_rows(blocks))
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("read the blocks noted"))?;
            for (inode, blockno, obj) in found {
                if let Some(o) = obj {
                    objects.insert(o);
                }
                read.blocks.insert(
                    (to_u64(inode, "inode")?, to_u64(blockno, "block number")?),
                    obj.map(|o| to_u64(o, "object id")).transpose()?,
                );
            }
        }
        if !whole.is_empty() {
            // One statement for every inode: a statement each costs a round trip to the
            // database's thread, which dominated rounds that ship many new files.
            for &inode in &whole {
                read.whole.insert(to_u64(inode, "inode")?, Vec::new());
            }
            // A row per inode, its mappings in one JSON array of (block number, object)
            // pairs (a row per mapping costs a trip through the database driver each), or
            // per `AGGREGATE_ROWS` of them (block numbers are distinct within an inode);
            // groups come in block order, so each inode's list is sorted.
            let found: Vec<(i64, String)> = sqlx::query_as(
                "SELECT b.inode, json_group_array(json_array(b.blockno, b.obj_id) \
                                                  ORDER BY b.blockno) \
                 FROM json_each(?1) AS j JOIN blocks b ON b.inode = j.value \
                 GROUP BY b.inode, b.blockno / ?2 ORDER BY b.inode, b.blockno / ?2",
            )
            .bind(json_ints(whole))
            .bind(AGGREGATE_ROWS as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("read the blocks of inodes"))?;
            for (inode, mappings) in found {
                let mappings: Vec<(u64, u64)> = from_json(&mappings, "mappings of an inode")?;
                for &(_, o) in &mappings {
                    objects.insert(to_i64(o)?);
                }
                read.whole
                    .entry(to_u64(inode, "inode")?)
                    .or_default()
                    .extend(mappings);
            }
        }
        if !merges.is_empty() {
            let found: Vec<MergeLookup> = sqlx::query_as(
                "SELECT j.value, m.target, m.cut, m.version FROM json_each(?1) AS j \
                 LEFT JOIN merges m ON m.staging = j.value",
            )
            .bind(json_ints(merges))
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("read the merges noted"))?;
            for (staging, target, cut, version) in found {
                let staging = to_u64(staging, "inode")?;
                let row = match (target, cut, version) {
                    (Some(t), Some(c), Some(v)) => Some((
                        staging,
                        to_u64(t, "inode")?,
                        to_u64(c, "cut")?,
                        to_u64(v, "version")?,
                    )),
                    _ => None,
                };
                read.merges.insert(staging, row);
            }
        }
        if !inodes.is_empty() {
            let found: Vec<(i64, bool, Option<i64>)> = sqlx::query_as(
                "SELECT j.value, EXISTS (SELECT 1 FROM files f WHERE f.inode = j.value), \
                        (SELECT m.target FROM merges m WHERE m.staging = j.value) \
                 FROM json_each(?1) AS j",
            )
            .bind(json_ints(inodes))
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("read what the inodes noted are"))?;
            for (inode, live, target) in found {
                let role = match (live, target) {
                    (true, _) => InodeRole::Live,
                    (false, Some(t)) => InodeRole::Staging {
                        target: to_u64(t, "inode")?,
                    },
                    (false, None) => InodeRole::Other,
                };
                read.roles.insert(to_u64(inode, "inode")?, role);
            }
        }
        if !objects.is_empty() {
            let objects: Vec<i64> = objects.into_iter().collect();
            read.objects.reserve(objects.len());
            for ids in objects.chunks(AGGREGATE_ROWS) {
                let found: String = sqlx::query_scalar(OBJECTS_AS_JSON)
                    .bind(json_ints(ids.iter().copied()))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(ctx("read the objects noted"))?;
                for o in from_json::<Vec<ObjectJson>>(&found, "objects noted")? {
                    let (id, info) = object_info(o)?;
                    read.objects.insert(id, info);
                }
            }
        }
        tx.commit().await.map_err(ctx("end a read transaction"))?;
        Ok(read)
    }

    /// The keys changed after clock value `through` (their latest change is later).
    pub async fn changed_after(&self, through: u64) -> Result<Vec<ChangeKey>> {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as("SELECT kind, a, b, name FROM meta_changes WHERE last > ?")
                .bind(to_i64(through)?)
                .fetch_all(&self.readers)
                .await
                .map_err(ctx("read the changes after a delta"))?;
        rows.into_iter()
            .map(|(k, a, b, n)| ChangeKey::from_columns(k, a, b, n))
            .collect()
    }

    /// Which of objects `ids` are confirmed in the store now.
    pub async fn uploaded_among(&self, ids: &[u64]) -> Result<HashSet<u64>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let list = json_ints(ids.iter().map(|&i| to_i64(i)).collect::<Result<Vec<_>>>()?);
        let found: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM objects WHERE state = 'uploaded' AND id IN (SELECT value FROM json_each(?1))",
        )
        .bind(list)
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("read the state of objects"))?;
        found.into_iter().map(|i| to_u64(i, "object id")).collect()
    }

    /// Records that the store now holds `rows` (shipped as object `seq` of generation
    /// `generation`), which carry the state of `keys` as of clock value `through`: the rows
    /// join the shipped state, keys not changed since are forgotten, the others stay noted
    /// from `through + 1` on. One transaction.
    pub async fn meta_shipped(
        &self,
        rows: &MetaRows,
        keys: &[ChangeKey],
        through: u64,
        generation: u64,
        seq: u64,
    ) -> Result<()> {
        let through = to_i64(through)?;
        let mut texts = Vec::with_capacity(keys.len());
        for k in keys {
            let (kind, a, b, name) = k.columns()?;
            texts.push(serde_json::json!([kind, a, b, name]));
        }
        let list = serde_json::Value::Array(texts).to_string();
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        apply_shipped(&mut tx, rows).await?;
        sqlx::query(
            "DELETE FROM meta_changes WHERE last <= ?2 AND (kind, a, b, name) IN \
             (SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM jsonb_each(?1) AS j)",
        )
        .bind(&list)
        .bind(through)
        .execute(&mut *tx)
        .await
        .map_err(ctx("forget shipped changes"))?;
        sqlx::query(
            "UPDATE meta_changes SET seq = max(seq, ?2 + 1) WHERE (kind, a, b, name) IN \
             (SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM jsonb_each(?1) AS j)",
        )
        .bind(&list)
        .bind(through)
        .execute(&mut *tx)
        .await
        .map_err(ctx("keep changes made after a delta"))?;
        set_position(&mut tx, generation, seq).await?;
        tx.commit()
            .await
            .map_err(ctx("commit the shipped changes"))?;
        self.synced();
        Ok(())
    }

    /// Whether the shipped state is empty (nothing was ever shipped, or all of it was
    /// removed): its snapshot costs nothing.
    pub async fn shipped_is_empty(&self) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM shipped_files) \
                AND NOT EXISTS (SELECT 1 FROM shipped_merges) \
                AND NOT EXISTS (SELECT 1 FROM shipped_blocks)",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("read whether anything was shipped"))
    }

    /// Records where shipping stands: the next metadata object is `seq + 1` of
    /// `generation` (a snapshot was written as `generation`: `seq` is 0).
    pub async fn meta_position_set(&self, generation: u64, seq: u64) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        set_position(&mut tx, generation, seq).await?;
        tx.commit()
            .await
            .map_err(ctx("commit the metadata position"))?;
        self.synced();
        Ok(())
    }

    /// The generation the metadata ships into and the number of its last delta (0: its
    /// snapshot), if this database ever shipped.
    pub async fn meta_position(&self) -> Result<Option<(u64, u64)>> {
        let row: (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT (SELECT value FROM volume WHERE key = 'meta_generation'), \
                    (SELECT value FROM volume WHERE key = 'meta_seq')",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("read where the metadata shipping stands"))?;
        let parse = |v: String| {
            v.parse::<u64>()
                .map_err(|_| Error::Invalid(format!("metadata position {v:?}")))
        };
        match row {
            (Some(g), Some(s)) => Ok(Some((parse(g)?, parse(s)?))),
            _ => Ok(None),
        }
    }

    /// How many changed keys wait to be shipped.
    pub async fn meta_pending(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM meta_changes")
            .fetch_one(&self.readers)
            .await
            .map_err(ctx("count the unshipped changes"))?;
        to_u64(n, "count")
    }

    /// Which of objects `ids` the shipped state names: their store deletion must wait until
    /// the metadata that released them is shipped.
    pub async fn shipped_among(&self, ids: &[u64]) -> Result<HashSet<u64>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let list = json_ints(ids.iter().map(|&i| to_i64(i)).collect::<Result<Vec<_>>>()?);
        let found: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT obj_id FROM shipped_blocks WHERE obj_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(list)
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("find the objects the shipped metadata names"))?;
        found.into_iter().map(|i| to_u64(i, "object id")).collect()
    }

    /// Starts reading a snapshot of the shipped state, in one read transaction.
    pub async fn snapshot_reader(&self) -> Result<SnapshotReader> {
        let tx = self
            .readers
            .begin()
            .await
            .map_err(ctx("begin a transaction"))?;
        Ok(SnapshotReader {
            tx,
            phase: Phase::Files(String::new()),
        })
    }
}

async fn set_value(tx: &mut sqlx::SqliteConnection, key: &'static str, value: &str) -> Result<()> {
    sqlx::query("INSERT OR REPLACE INTO volume (key, value) VALUES (?, ?)")
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await
        .map_err(ctx("record the volume's settings"))?;
    Ok(())
}

async fn set_position(tx: &mut sqlx::SqliteConnection, generation: u64, seq: u64) -> Result<()> {
    set_value(tx, "meta_generation", &generation.to_string()).await?;
    set_value(tx, "meta_seq", &seq.to_string()).await
}

/// Applies `rows` to the shipped state: upserts and removals, then drops the block mappings
/// of inodes no shipped file or merge names any more, and the objects no shipped mapping
/// names.
async fn apply_shipped(tx: &mut sqlx::SqliteConnection, rows: &MetaRows) -> Result<()> {
    let mut inodes: Vec<i64> = Vec::new();
    let mut objects: Vec<i64> = Vec::new();
    if !rows.objects.is_empty() {
        for (id, hash, len, stored) in &rows.objects {
            to_i64(*id)?;
            to_i64(*len)?;
            stored.map(to_i64).transpose()?;
            if let Some(hash) = hash.as_deref()
                && unhex(hash)?.len() != 32
            {
                return Err(Error::Invalid(format!(
                    "object {id} has a hash that is not 32 bytes"
                )));
            }
        }
        // One statement for all of them: a statement per object costs a round trip to the
        // database's thread each, which dominated large deltas and restores.
        sqlx::query(
            "INSERT OR REPLACE INTO shipped_objects (id, hash, length, stored_size) \
             SELECT j.value ->> 0, unhex(j.value ->> 1), j.value ->> 2, j.value ->> 3 \
             FROM jsonb_each(?1) AS j",
        )
        .bind(serde_json::to_string(&rows.objects).expect("objects serialize"))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record shipped objects"))?;
    }
    let names: Vec<&str> = rows
        .dead_files
        .iter()
        .map(String::as_str)
        .chain(rows.files.iter().map(|f| f.0.as_str()))
        .collect();
    if !names.is_empty() {
        let old: Vec<i64> = sqlx::query_scalar(
            "SELECT inode FROM shipped_files WHERE name IN (SELECT value FROM json_each(?1))",
        )
        .bind(json(&names))
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("read shipped files"))?;
        inodes.extend(old);
    }
    if !rows.dead_files.is_empty() {
        sqlx::query("DELETE FROM shipped_files WHERE name IN (SELECT value FROM json_each(?1))")
            .bind(json(&rows.dead_files))
            .execute(&mut *tx)
            .await
            .map_err(ctx("record shipped file removals"))?;
    }
    if !rows.files.is_empty() {
        sqlx::query(
            "INSERT OR REPLACE INTO shipped_files (name, inode, size, mtime_ns, version) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4 \
             FROM jsonb_each(?1) AS j",
        )
        .bind(json(&rows.files))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record shipped files"))?;
    }
    if !rows.file_attrs.is_empty() {
        sqlx::query(
            "UPDATE shipped_files SET attrs = j.value ->> 1 FROM jsonb_each(?1) AS j \
             WHERE shipped_files.name = j.value ->> 0",
        )
        .bind(json(&rows.file_attrs))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record shipped file attributes"))?;
    }
    if !rows.dead_merges.is_empty() {
        for s in &rows.dead_merges {
            inodes.push(to_i64(*s)?);
        }
        sqlx::query(
            "DELETE FROM shipped_merges WHERE staging IN (SELECT value FROM json_each(?1))",
        )
        .bind(json(&rows.dead_merges))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record shipped merge removals"))?;
    }
    if !rows.merges.is_empty() {
        sqlx::query(
            "INSERT OR REPLACE INTO shipped_merges (staging, target, cut, version) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM jsonb_each(?1) AS j",
        )
        .bind(json(&rows.merges))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record shipped merges"))?;
    }
    if !rows.dead_blocks.is_empty() {
        let old: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM shipped_blocks WHERE (inode, blockno) IN \
             (SELECT j.value ->> 0, j.value ->> 1 FROM jsonb_each(?1) AS j) RETURNING obj_id",
        )
        .bind(json(&rows.dead_blocks))
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("record shipped block removals"))?;
        objects.extend(old);
    }
    if !rows.blocks.is_empty() {
        let old: Vec<i64> = sqlx::query_scalar(
            "SELECT s.obj_id FROM jsonb_each(?1) AS j JOIN shipped_blocks s \
             ON s.inode = (j.value ->> 0) AND s.blockno = (j.value ->> 1)",
        )
        .bind(json(&rows.blocks))
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("read shipped block mappings"))?;
        objects.extend(old);
        sqlx::query(
            "INSERT OR REPLACE INTO shipped_blocks (inode, blockno, obj_id) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2 FROM jsonb_each(?1) AS j",
        )
        .bind(json(&rows.blocks))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record shipped block mappings"))?;
    }
    if !inodes.is_empty() {
        let old: Vec<i64> = sqlx::query_scalar(
            // Correlated lookups by index: `NOT IN (SELECT ...)` would build the whole
            // set of shipped inodes at every delta.
            "DELETE FROM shipped_blocks WHERE inode IN (SELECT value FROM json_each(?1)) \
               AND NOT EXISTS (SELECT 1 FROM shipped_files f WHERE f.inode = shipped_blocks.inode) \
               AND NOT EXISTS (SELECT 1 FROM shipped_merges m WHERE m.staging = shipped_blocks.inode) \
             RETURNING obj_id",
        )
        .bind(json_ints(inodes))
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("drop the shipped blocks of unnamed inodes"))?;
        objects.extend(old);
    }
    if !objects.is_empty() {
        sqlx::query(
            "DELETE FROM shipped_objects WHERE id IN (SELECT value FROM json_each(?1)) \
               AND NOT EXISTS (SELECT 1 FROM shipped_blocks b WHERE b.obj_id = shipped_objects.id)",
        )
        .bind(json_ints(objects))
        .execute(&mut *tx)
        .await
        .map_err(ctx("drop shipped objects nothing names"))?;
    }
    Ok(())
}

enum Phase {
    /// Files after this name.
    Files(String),
    Merges,
    /// Blocks after this key.
    Blocks(i64, i64),
    Done,
}

/// Reads the shipped state part by part (see [`Db::snapshot_reader`]).
pub struct SnapshotReader {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    phase: Phase,
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader").finish_non_exhaustive()
    }
}

impl SnapshotReader {
    /// The next part of at most about `max_rows` rows; `None` when all were read. A block
    /// mapping comes with its object, unless an earlier row of the part brought it.
    pub async fn next_part(&mut self, max_rows: usize) -> Result<Option<MetaRows>> {
        let limit = i64::try_from(max_rows.max(2)).unwrap_or(i64::MAX);
        let mut part = MetaRows::default();
        loop {
            let room = limit - part.len() as i64;
            if room < 2 {
                return Ok(Some(part));
            }
            match &self.phase {
                Phase::Files(after) => {
                    let rows: Vec<(String, i64, i64, i64, i64, Option<String>)> = sqlx::query_as(
                        "SELECT name, inode, size, mtime_ns, version, attrs FROM shipped_files \
                         WHERE name > ? ORDER BY name LIMIT ?",
                    )
                    .bind(after)
                    .bind(room)
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(ctx("read the files for a snapshot"))?;
                    let short = (rows.len() as i64) < room;
                    let mut last = None;
                    for (name, inode, size, mtime, version, attrs) in rows {
                        last = Some(name.clone());
                        if let Some(a) = attrs {
                            part.file_attrs.push((name.clone(), a));
                        }
                        part.files.push((
                            name,
                            to_u64(inode, "inode")?,
                            to_u64(size, "size")?,
                            mtime,
                            to_u64(version, "version")?,
                        ));
                    }
                    self.phase = if short {
                        Phase::Merges
                    } else {
                        Phase::Files(last.unwrap_or_default())
                    };
                }
                Phase::Merges => {
                    let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
                        "SELECT staging, target, cut, version FROM shipped_merges ORDER BY staging",
                    )
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(ctx("read the merges for a snapshot"))?;
                    for (s, t, c, v) in rows {
                        part.merges.push((
                            to_u64(s, "inode")?,
                            to_u64(t, "inode")?,
                            to_u64(c, "cut")?,
                            to_u64(v, "version")?,
                        ));
                    }
                    self.phase = Phase::Blocks(-1, -1);
                }
                Phase::Blocks(inode, blockno) => {
                    let want = room / 2;
                    let rows: Vec<SnapshotBlock> = sqlx::query_as(
                        "SELECT b.inode, b.blockno, b.obj_id, o.hash, o.length, o.stored_size \
                             FROM shipped_blocks b LEFT JOIN shipped_objects o ON o.id = b.obj_id \
                             WHERE (b.inode, b.blockno) > (?, ?) \
                             ORDER BY b.inode, b.blockno LIMIT ?",
                    )
                    .bind(*inode)
                    .bind(*blockno)
                    .bind(want)
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(ctx("read the blocks for a snapshot"))?;
                    let short = (rows.len() as i64) < want;
                    let mut seen = HashSet::new();
                    let mut last = (*inode, *blockno);
                    for (i, b, id, hash, length, stored) in rows {
                        last = (i, b);
                        let id = to_u64(id, "object id")?;
                        part.blocks
                            .push((to_u64(i, "inode")?, to_u64(b, "block number")?, id));
                        if let Some(length) = length
                            && seen.insert(id)
                        {
                            part.objects.push((
                                id,
                                hash.as_deref().map(hex),
                                to_u64(length, "length")?,
                                stored.map(|s| to_u64(s, "stored size")).transpose()?,
                            ));
                        }
                    }
                    self.phase = if short {
                        Phase::Done
                    } else {
                        Phase::Blocks(last.0, last.1)
                    };
                }
                Phase::Done => {
                    return Ok((!part.is_empty()).then_some(part));
                }
            }
        }
    }
}

/// Counts of a restored volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RestoredCounts {
    /// Files restored.
    pub files: u64,
    /// Block mappings restored.
    pub blocks: u64,
    /// Objects restored.
    pub objects: u64,
    /// Merges left to redo at the first open.
    pub merges: u64,
    /// Objects named by block mappings that the metadata did not describe (reads of their
    /// blocks fail).
    pub unknown_objects: u64,
}

/// The volume's settings a restore writes.
#[derive(Debug, Clone)]
pub struct RestoreVolume {
    /// The volume's id.
    pub id: String,
    /// Its block size.
    pub block_size: u64,
    /// Where the namespace's inodes start.
    pub namespace_floor: Option<u64>,
}

/// Rebuilding a volume from shipped metadata: the rows of a generation are applied to the
/// shipped state of an empty database, which then becomes the volume's state.
impl Db {
    /// Whether the volume's tables hold nothing (a restore may write into it).
    pub async fn is_empty_volume(&self) -> Result<bool> {
        let used: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM objects) OR EXISTS (SELECT 1 FROM blocks) \
                 OR EXISTS (SELECT 1 FROM files) OR EXISTS (SELECT 1 FROM inodes) \
                 OR EXISTS (SELECT 1 FROM pending_deletions) \
                 OR EXISTS (SELECT 1 FROM shipped_files) OR EXISTS (SELECT 1 FROM shipped_blocks)",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(ctx("find whether the volume is empty"))?;
        Ok(!used)
    }

    /// Applies the rows of a snapshot part or a delta to the shipped state (one
    /// transaction).
    pub async fn restore_apply(&self, rows: &MetaRows) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        apply_shipped(&mut tx, rows).await?;
        tx.commit().await.map_err(ctx("commit restored rows"))?;
        Ok(())
    }

    /// Applies a delta found in the store that this database did not record as shipped
    /// (its upload succeeded, and the process stopped before recording it): it is part of
    /// the shipped state, as object `seq` of `generation`.
    pub async fn adopt_shipped(&self, rows: &MetaRows, generation: u64, seq: u64) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        apply_shipped(&mut tx, rows).await?;
        set_position(&mut tx, generation, seq).await?;
        tx.commit().await.map_err(ctx("commit adopted rows"))?;
        self.synced();
        Ok(())
    }

    /// Every object id the volume's metadata names.
    pub async fn object_ids(&self) -> Result<Vec<u64>> {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM objects ORDER BY id")
            .fetch_all(&self.readers)
            .await
            .map_err(ctx("list the objects"))?;
        ids.into_iter().map(|i| to_u64(i, "object id")).collect()
    }

    /// Names of files (at most `limit`) with a block mapped to one of objects `ids`.
    pub async fn files_naming(&self, ids: &[u64], limit: u32) -> Result<Vec<String>> {
        let list = json_ints(ids.iter().map(|&i| to_i64(i)).collect::<Result<Vec<_>>>()?);
        sqlx::query_scalar(
            "SELECT DISTINCT f.name FROM files f JOIN blocks b ON b.inode = f.inode \
             WHERE b.obj_id IN (SELECT value FROM json_each(?1)) ORDER BY f.name LIMIT ?2",
        )
        .bind(list)
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(ctx("find the files of objects"))
    }

    /// Forgets the shipped state (a restore that starts over with another generation).
    pub async fn restore_reset(&self) -> Result<()> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        for statement in [
            "DELETE FROM shipped_files",
            "DELETE FROM shipped_merges",
            "DELETE FROM shipped_blocks",
            "DELETE FROM shipped_objects",
        ] {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(ctx("forget the shipped state"))?;
        }
        tx.commit().await.map_err(ctx("commit a restore reset"))?;
        Ok(())
    }

    /// Builds the volume's tables from the shipped state, in one transaction: files and
    /// their inodes, the merges left to redo, the block mappings of those inodes, the
    /// objects they name (refcounts counted, each one in the store), the volume's settings.
    /// Nothing is left noted as unshipped: the shipped state is the volume's state.
    pub async fn restore_finish(&self, volume: &RestoreVolume) -> Result<RestoredCounts> {
        let mut w = self.write().await?;
        let mut tx = w.begin().await.map_err(ctx("begin a transaction"))?;
        let steps: [(&'static str, &'static str); 8] = [
            (
                "INSERT INTO inodes (inode, state) SELECT inode, 'live' FROM shipped_files",
                "restore the inodes",
            ),
            (
                "INSERT INTO inodes (inode, state) SELECT staging, 'staging' FROM shipped_merges \
                 WHERE staging NOT IN (SELECT inode FROM shipped_files)",
                "restore the staging inodes",
            ),
            // A mapping whose object the metadata lacks gets a placeholder that reads fail
            // on (the store has no such object), never zeros.
            (
                "INSERT INTO shipped_objects (id, hash, length, stored_size) \
                 SELECT DISTINCT b.obj_id, NULL, ?, NULL FROM shipped_blocks b \
                 WHERE b.obj_id NOT IN (SELECT id FROM shipped_objects)",
                "note the objects the metadata lacks",
            ),
            (
                "INSERT INTO objects (id, hash, refcount, length, stored_size, state) \
                 SELECT o.id, \
                        CASE WHEN o.id = (SELECT min(o2.id) FROM shipped_objects o2 WHERE o2.hash = o.hash) \
                             THEN o.hash ELSE NULL END, \
                        (SELECT count(*) FROM shipped_blocks b \
                           JOIN inodes i ON i.inode = b.inode WHERE b.obj_id = o.id), \
                        o.length, coalesce(o.stored_size, o.length), 'uploaded' \
                 FROM shipped_objects o \
                 WHERE EXISTS (SELECT 1 FROM shipped_blocks b \
                                 JOIN inodes i ON i.inode = b.inode WHERE b.obj_id = o.id) \
                 ORDER BY o.id",
                "restore the objects",
            ),
            (
                "INSERT INTO blocks (inode, blockno, obj_id) \
                 SELECT inode, blockno, obj_id FROM shipped_blocks \
                 WHERE inode IN (SELECT inode FROM inodes) ORDER BY inode, blockno",
                "restore the block mappings",
            ),
            (
                "INSERT INTO files (name, inode, size, mtime_ns, version, attrs) \
                 SELECT name, inode, size, mtime_ns, version, attrs FROM shipped_files",
                "restore the files",
            ),
            (
                "INSERT INTO merges (staging, target, cut, version) \
                 SELECT staging, target, cut, version FROM shipped_merges",
                "restore the merges",
            ),
            (
                "DELETE FROM meta_changes",
                "forget the changes of a restore",
            ),
        ];
        let mut counts = RestoredCounts::default();
        for (i, (statement, what)) in steps.iter().enumerate() {
            let mut query = sqlx::query(*statement);
            if i == 2 {
                query = query.bind(to_i64(volume.block_size)?);
            }
            let done = query.execute(&mut *tx).await.map_err(ctx(what))?;
            match i {
                2 => counts.unknown_objects = done.rows_affected(),
                3 => counts.objects = done.rows_affected(),
                4 => counts.blocks = done.rows_affected(),
                5 => counts.files = done.rows_affected(),
                6 => counts.merges = done.rows_affected(),
                _ => {}
            }
        }
        set_value(&mut tx, "block_size", &volume.block_size.to_string()).await?;
        set_value(&mut tx, "id", &volume.id).await?;
        set_value(&mut tx, "store_volume", &volume.id).await?;
        let max_inode: i64 = sqlx::query_scalar("SELECT coalesce(max(inode), 0) FROM inodes")
            .fetch_one(&mut *tx)
            .await
            .map_err(ctx("find the largest inode"))?;
        if let Some(floor) = volume.namespace_floor {
            set_value(&mut tx, "namespace_floor", &floor.to_string()).await?;
            let next = to_i64(floor)?.max(max_inode + 1);
            crate::volume::move_allocator(&mut tx, "inodes", next).await?;
        }
        tx.commit().await.map_err(ctx("commit the restore"))?;
        self.synced();
        Ok(counts)
    }
}

/// JSON of a row list, for `json_each`.
fn json<T: Serialize>(rows: &T) -> String {
    serde_json::to_string(rows).expect("rows serialize")
}
