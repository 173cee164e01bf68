//! Set-based versions of the hot write paths: a batch of N blocks costs a handful of
//! statements, not a few statements per block.
//!
//! Every statement is a round trip to sqlx's worker thread, and on a small machine those
//! hand-offs, not SQLite, are the cost of a commit. Batches are passed to SQLite as one JSON array of integers
//! (read with `json_each`) plus, for hashes, one blob of 32-byte digests (read with `substr`),
//! so every statement text is fixed and stays in sqlx's statement cache.

use std::collections::HashMap;
use std::fmt::Write as _;

use sqlx::SqliteConnection;

use crate::{
    CommitRequest, Committed, Error, Hash, ObjectState, Outcome, Result, ctx, to_i64, to_u64,
};

/// A JSON array of arrays of integers: `[[1,2],[3,4]]`.
pub(crate) fn json_rows<const N: usize>(rows: impl IntoIterator<Item = [i64; N]>) -> String {
    let mut out = String::from("[");
    for (i, row) in rows.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "{v}");
        }
        out.push(']');
    }
    out.push(']');
    out
}

/// A JSON array of integers: `[1,2,3]`.
pub(crate) fn json_ints(values: impl IntoIterator<Item = i64>) -> String {
    let mut out = String::from("[");
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v}");
    }
    out.push(']');
    out
}

/// Where a block points after the commit: an object that existed before the batch, or the
/// `k`-th object created by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Existing(i64),
    New(usize),
}

/// What one block of a batch does.
#[derive(Debug, Clone, Copy)]
enum Decision {
    Unchanged(i64, ObjectState),
    Linked(Target, ObjectState),
    Created(Target),
}

/// Commits a batch inside the caller's transaction. Blocks must be distinct (checked).
///
/// The result equals committing the blocks one by one, except that every new reference is
/// taken before any old one is dropped: an object that one block leaves and another block of
/// the same batch takes up is kept rather than deleted and registered again.
pub(crate) async fn commit_blocks(
    tx: &mut SqliteConnection,
    requests: &[CommitRequest],
) -> Result<Vec<Committed>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys = Vec::with_capacity(requests.len());
    let mut seen = std::collections::HashSet::with_capacity(requests.len());
    let mut hashes = Vec::with_capacity(requests.len() * 32);
    for r in requests {
        if !seen.insert((r.inode, r.blockno)) {
            return Err(Error::DuplicateBlock {
                inode: r.inode,
                blockno: r.blockno,
            });
        }
        keys.push([to_i64(r.inode)?, to_i64(r.blockno)?]);
        to_i64(r.length)?;
        hashes.extend_from_slice(&r.hash);
    }
    // One lookup for the whole batch: per block, the object it points to now (with its
    // refcount) and the object that already holds its new content (with its state).
    type Row = (i64, Option<i64>, Option<i64>, Option<i64>, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT j.key, b.obj_id, ob.refcount, o.id, o.state \
         FROM jsonb_each(?1) AS j \
         LEFT JOIN blocks AS b ON b.inode = (j.value ->> 0) AND b.blockno = (j.value ->> 1) \
         LEFT JOIN objects AS ob ON ob.id = b.obj_id \
         LEFT JOIN objects AS o ON o.hash = substr(?2, j.key * 32 + 1, 32)",
    )
    .bind(json_rows(keys.iter().copied()))
    .bind(&hashes)
    .fetch_all(&mut *tx)
    .await
    .map_err(ctx("look up blocks and their contents"))?;
    if rows.len() != requests.len() {
        return Err(Error::Invalid(format!(
            "lookup of {} blocks returned {} rows",
            requests.len(),
            rows.len()
        )));
    }
    let mut found = vec![None; requests.len()];
    for row in rows {
        let i = usize::try_from(row.0)
            .ok()
            .filter(|&i| i < requests.len() && found[i].is_none())
            .ok_or_else(|| Error::Invalid(format!("lookup returned row {}", row.0)))?;
        found[i] = Some(row);
    }

    // Decide every block in order, as one-by-one commits would (new references first).
    let mut by_hash: HashMap<Hash, (Target, ObjectState)> = HashMap::new();
    let mut new_objects: Vec<(usize, i64)> = Vec::new(); // (creating request, refcount)
    let mut delta: HashMap<i64, i64> = HashMap::new();
    let mut refcount_before: HashMap<i64, i64> = HashMap::new();
    let mut last_release: HashMap<i64, usize> = HashMap::new();
    let mut mappings: Vec<(usize, Target)> = Vec::new();
    let mut decided: Vec<Decision> = Vec::with_capacity(requests.len());
    for (i, (r, row)) in requests.iter().zip(found).enumerate() {
        let (_, old, old_refcount, existing, existing_state) =
            row.expect("every index was checked above");
        let known = match by_hash.get(&r.hash) {
            Some(&t) => Some(t),
            None => match (existing, existing_state) {
                (Some(id), Some(state)) => {
                    let t = (Target::Existing(id), ObjectState::parse(&state)?);
                    by_hash.insert(r.hash, t);
                    Some(t)
                }
                _ => None,
            },
        };
        let target = match known {
            Some((Target::Existing(id), state)) if old == Some(id) => {
                decided.push(Decision::Unchanged(id, state));
                continue;
            }
            Some((target, state)) => {
                match target {
                    Target::Existing(id) => *delta.entry(id).or_default() += 1,
                    Target::New(k) => new_objects[k].1 += 1,
                }
                decided.push(Decision::Linked(target, state));
                target
            }
            None => {
                let target = Target::New(new_objects.len());
                new_objects.push((i, 1));
                by_hash.insert(r.hash, (target, ObjectState::Uploading));
                decided.push(Decision::Created(target));
                target
            }
        };
        mappings.push((i, target));
        if let Some(old) = old {
            let before = old_refcount.ok_or_else(|| {
                Error::Invalid(format!(
                    "block points to object {old}, which does not exist"
                ))
            })?;
            refcount_before.insert(old, before);
            *delta.entry(old).or_default() -= 1;
            last_release.insert(old, i);
        }
    }

    // Register the new objects; map their ids back through their (unique) hashes.
    let mut new_ids = vec![0i64; new_objects.len()];
    if !new_objects.is_empty() {
        let spec = new_objects
            .iter()
            .map(|&(i, refcount)| Ok([i as i64, refcount, to_i64(requests[i].length)?]))
            .collect::<Result<Vec<_>>>()?;
        let created: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "INSERT INTO objects (hash, refcount, length, stored_size, state) \
             SELECT substr(?2, (j.value ->> 0) * 32 + 1, 32), j.value ->> 1, j.value ->> 2, \
                    NULL, 'uploading' \
             FROM jsonb_each(?1) AS j WHERE true \
             RETURNING id, hash",
        )
        .bind(json_rows(spec))
        .bind(&hashes)
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("register new objects"))?;
        let index: HashMap<&[u8], usize> = new_objects
            .iter()
            .enumerate()
            .map(|(k, &(i, _))| (&requests[i].hash[..], k))
            .collect();
        let mut filled = 0;
        for (id, hash) in created {
            let k = *index.get(hash.as_slice()).ok_or_else(|| {
                Error::Invalid(format!("new object {id} has a hash nobody asked for"))
            })?;
            new_ids[k] = id;
            filled += 1;
        }
        if filled != new_objects.len() {
            return Err(Error::Invalid(format!(
                "registered {filled} of {} new objects",
                new_objects.len()
            )));
        }
    }
    let id_of = |t: Target| match t {
        Target::Existing(id) => id,
        Target::New(k) => new_ids[k],
    };

    // Net reference changes; objects left without references are deleted below.
    let mut changes = Vec::new();
    let mut unreferenced = Vec::new();
    for (&id, &d) in &delta {
        if d == 0 {
            continue;
        }
        if d < 0 {
            let after = refcount_before[&id] + d;
            if after < 0 {
                return Err(Error::Invalid(format!(
                    "object {id} would have refcount {after}"
                )));
            }
            if after == 0 {
                unreferenced.push(id);
                continue;
            }
        }
        changes.push([id, d]);
    }
    if !changes.is_empty() {
        sqlx::query(
            "UPDATE objects SET refcount = refcount + (j.value ->> 1) \
             FROM jsonb_each(?1) AS j WHERE objects.id = (j.value ->> 0)",
        )
        .bind(json_rows(changes))
        .execute(&mut *tx)
        .await
        .map_err(ctx("change object refcounts"))?;
    }
    if !mappings.is_empty() {
        // Insert or repoint the mappings (the upsert fires the totals triggers while the old
        // objects still exist).
        sqlx::query(
            "INSERT INTO blocks (inode, blockno, obj_id) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2 FROM jsonb_each(?1) AS j WHERE true \
             ON CONFLICT (inode, blockno) DO UPDATE SET obj_id = excluded.obj_id",
        )
        .bind(json_rows(
            mappings
                .iter()
                .map(|&(i, t)| [keys[i][0], keys[i][1], id_of(t)]),
        ))
        .execute(&mut *tx)
        .await
        .map_err(ctx("set block mappings"))?;
    }
    delete_objects(tx, &unreferenced).await?;

    let mut results: Vec<Committed> = decided
        .into_iter()
        .map(|d| {
            let outcome = match d {
                Decision::Unchanged(id, state) => Outcome::Unchanged {
                    obj_id: to_u64(id, "object id")?,
                    state,
                },
                Decision::Linked(target, state) => Outcome::Linked {
                    obj_id: to_u64(id_of(target), "object id")?,
                    state,
                },
                Decision::Created(target) => Outcome::Created {
                    obj_id: to_u64(id_of(target), "object id")?,
                },
            };
            Ok(Committed {
                outcome,
                released: None,
            })
        })
        .collect::<Result<_>>()?;
    for id in unreferenced {
        results[last_release[&id]].released = Some(to_u64(id, "object id")?);
    }
    Ok(results)
}

/// Deletes objects left without references and records their pending deletions.
async fn delete_objects(tx: &mut SqliteConnection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = json_ints(ids.iter().copied());
    sqlx::query("DELETE FROM objects WHERE id IN (SELECT value FROM json_each(?1))")
        .bind(&list)
        .execute(&mut *tx)
        .await
        .map_err(ctx("delete unreferenced objects"))?;
    sqlx::query(
        "INSERT OR IGNORE INTO pending_deletions (obj_id) SELECT value FROM json_each(?1) WHERE true",
    )
    .bind(&list)
    .execute(&mut *tx)
    .await
    .map_err(ctx("record pending deletions"))?;
    Ok(())
}

/// Removes mappings and drops their references inside the caller's transaction; returns the
/// objects left without references (deleted, with pending deletions recorded).
pub(crate) async fn remove_blocks(
    tx: &mut SqliteConnection,
    blocks: &[(u64, u64)],
) -> Result<Vec<u64>> {
    if blocks.is_empty() {
        return Ok(Vec::new());
    }
    let keys = blocks
        .iter()
        .map(|&(inode, blockno)| Ok([to_i64(inode)?, to_i64(blockno)?]))
        .collect::<Result<Vec<_>>>()?;
    let old: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM blocks WHERE (inode, blockno) IN \
         (SELECT j.value ->> 0, j.value ->> 1 FROM jsonb_each(?1) AS j) \
         RETURNING obj_id",
    )
    .bind(json_rows(keys))
    .fetch_all(&mut *tx)
    .await
    .map_err(ctx("delete block mappings"))?;
    let mut drops: HashMap<i64, i64> = HashMap::new();
    for id in old {
        *drops.entry(id).or_default() += 1;
    }
    if drops.is_empty() {
        return Ok(Vec::new());
    }
    let left: Vec<(i64, i64)> = sqlx::query_as(
        "UPDATE objects SET refcount = refcount - (j.value ->> 1) \
         FROM jsonb_each(?1) AS j WHERE objects.id = (j.value ->> 0) \
         RETURNING objects.id, objects.refcount",
    )
    .bind(json_rows(drops.iter().map(|(&id, &n)| [id, n])))
    .fetch_all(&mut *tx)
    .await
    .map_err(ctx("drop references to objects"))?;
    if left.len() != drops.len() {
        return Err(Error::Invalid(format!(
            "mappings pointed to {} objects, {} of which exist",
            drops.len(),
            left.len()
        )));
    }
    let mut unreferenced: Vec<i64> = left
        .into_iter()
        .filter(|&(_, refcount)| refcount == 0)
        .map(|(id, _)| id)
        .collect();
    unreferenced.sort_unstable();
    delete_objects(tx, &unreferenced).await?;
    unreferenced
        .into_iter()
        .map(|id| to_u64(id, "object id"))
        .collect()
}

/// Records upload outcomes inside the caller's transaction; see [`crate::Db::record_uploads`].
pub(crate) async fn record_uploads(
    tx: &mut SqliteConnection,
    outcomes: &[(u64, Option<u64>)],
) -> Result<Vec<bool>> {
    let mut succeeded = Vec::new();
    for &(id, stored) in outcomes {
        if let Some(size) = stored {
            succeeded.push([to_i64(id)?, to_i64(size)?]);
        } else {
            to_i64(id)?;
        }
    }
    let recorded: std::collections::HashSet<i64> = if succeeded.is_empty() {
        Default::default()
    } else {
        sqlx::query_scalar(
            "UPDATE objects SET state = 'uploaded', stored_size = (j.value ->> 1) \
             FROM jsonb_each(?1) AS j \
             WHERE objects.id = (j.value ->> 0) AND objects.state = 'uploading' \
             RETURNING objects.id",
        )
        .bind(json_rows(succeeded))
        .fetch_all(&mut *tx)
        .await
        .map_err(ctx("confirm uploads"))?
        .into_iter()
        .collect()
    };
    let failed: Vec<i64> = outcomes
        .iter()
        .map(|&(id, _)| id as i64)
        .filter(|id| !recorded.contains(id))
        .collect();
    if !failed.is_empty() {
        sqlx::query(
            "UPDATE objects SET state = 'failed', hash = NULL \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'uploading'",
        )
        .bind(json_ints(failed))
        .execute(&mut *tx)
        .await
        .map_err(ctx("record failed uploads"))?;
    }
    Ok(outcomes
        .iter()
        .map(|&(id, _)| recorded.contains(&(id as i64)))
        .collect())
}

/// Forgets pending deletions inside the caller's transaction.
pub(crate) async fn finish_deletions(tx: &mut SqliteConnection, ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = json_ints(
        ids.iter()
            .map(|&id| to_i64(id))
            .collect::<Result<Vec<_>>>()?,
    );
    sqlx::query("DELETE FROM pending_deletions WHERE obj_id IN (SELECT value FROM json_each(?1))")
        .bind(list)
        .execute(&mut *tx)
        .await
        .map_err(ctx("forget pending deletions"))?;
    Ok(())
}
