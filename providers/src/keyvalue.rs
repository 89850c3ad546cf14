//! The `wasi:keyvalue@0.2.0-draft` provider: a tenant's buckets in one redb file, one table per
//! bucket (`bucket:<identifier>`), keys as strings, values as bytes.
//!
//! Buckets exist lazily: any valid identifier opens, a bucket that was never written reads as
//! empty, and its table is created by the first write. Every write is one redb write transaction
//! committed with [`Durability::Immediate`], so a write acknowledged to the guest survives a
//! crash, and the batch writes are atomic. Counters (`atomics.increment`) are stored as decimal
//! ASCII text, as wasmtime's reference implementation stores them, so `get` of a counter reads
//! `b"42"`; an increment past `u64::MAX` fails rather than wrapping, as there.
//!
//! Identifiers and keys are checked here ([`MAX_BUCKET_LEN`], [`MAX_KEY_LEN`]); what a reply
//! may hold is bounded by the frame limit, which `list-keys` respects by ending a page early.

use std::path::Path;

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use wasmvisor_abi::capability::MAX_FRAME_LEN;

/// Longest bucket identifier, in bytes.
pub(crate) const MAX_BUCKET_LEN: usize = 255;
/// Longest key, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 4096;
/// Most keys in one `list-keys` page.
pub(crate) const LIST_PAGE_KEYS: usize = 1000;
/// Bytes of a `list-keys` page's keys (with their length prefixes), leaving room for the
/// envelope, so that a page always fits in one frame.
const LIST_PAGE_BYTES: usize = MAX_FRAME_LEN as usize - 64;
/// redb's page cache per tenant; tenant stores are small, and redb's 1 GiB default is per file.
const CACHE_BYTES: usize = 16 << 20;

/// Why a key-value operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KvError {
    /// The request is out of range (bad identifier or key); nothing was done.
    #[error("{0}")]
    BadRequest(String),
    /// The operation is valid but could not be carried out (storage error, not a counter, ...).
    #[error("{0}")]
    Provider(String),
}

fn storage(err: impl Into<redb::Error>) -> KvError {
    KvError::Provider(format!("key-value storage failed: {}", err.into()))
}

/// A present key with its value, as `get-many` returns it.
pub(crate) type Entry = (String, Vec<u8>);

type Def<'n> = TableDefinition<'n, &'static str, &'static [u8]>;

/// Checks a bucket identifier and returns its table's name. The empty identifier is the
/// tenant's default bucket (components written against wasmtime's reference host open "").
fn table_name(bucket: &str) -> Result<String, KvError> {
    if bucket.len() > MAX_BUCKET_LEN {
        return Err(KvError::BadRequest(format!(
            "bucket identifier of {} bytes exceeds the {MAX_BUCKET_LEN}-byte limit",
            bucket.len()
        )));
    }
    Ok(format!("bucket:{bucket}"))
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::BadRequest("the key is empty".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KvError::BadRequest(format!("key of {} bytes exceeds the {MAX_KEY_LEN}-byte limit", key.len())));
    }
    Ok(())
}

/// Bytes of postcard's varint encoding of `n`.
fn varint_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

/// A tenant's open key-value database.
#[derive(Debug)]
pub(crate) struct KvStore {
    db: Database,
}

impl KvStore {
    /// Opens, or creates, the database at `path`. Fails with `DatabaseAlreadyOpen` while another
    /// handle (in any process) has it open.
    pub(crate) fn open(path: &Path) -> Result<Self, redb::DatabaseError> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path)?;
        Ok(Self { db })
    }

    /// Runs `f` on the bucket's table in a read transaction; `None` if it was never written.
    fn read<T>(
        &self,
        bucket: &str,
        f: impl FnOnce(Option<&ReadOnlyTable<&'static str, &'static [u8]>>) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let name = table_name(bucket)?;
        let txn = self.db.begin_read().map_err(storage)?;
        match txn.open_table(Def::new(&name)) {
            Ok(table) => f(Some(&table)),
            Err(redb::TableError::TableDoesNotExist(_)) => f(None),
            Err(err) => Err(storage(err)),
        }
    }

    /// Runs `f` on the bucket's table in a write transaction, committed durably if `f` succeeds
    /// and abandoned (nothing written) if it fails.
    fn write<T>(
        &self,
        bucket: &str,
        f: impl FnOnce(&mut Table<'_, &'static str, &'static [u8]>) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let name = table_name(bucket)?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(|e| KvError::Provider(e.to_string()))?;
        let value = {
            let mut table = txn.open_table(Def::new(&name)).map_err(storage)?;
            f(&mut table)?
        };
        txn.commit().map_err(storage)?;
        Ok(value)
    }

    /// `store.open`: checks the identifier; the bucket itself is created by its first write.
    pub(crate) fn open_bucket(&self, bucket: &str) -> Result<(), KvError> {
        table_name(bucket).map(drop)
    }

    /// `bucket.get`.
    pub(crate) fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        self.read(bucket, |table| {
            let Some(table) = table else { return Ok(None) };
            Ok(table.get(key).map_err(storage)?.map(|v| v.value().to_vec()))
        })
    }

    /// `bucket.set`.
    pub(crate) fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        check_key(key)?;
        self.write(bucket, |table| table.insert(key, value).map(drop).map_err(storage))
    }

    /// `bucket.delete`: deleting an absent key succeeds.
    pub(crate) fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        check_key(key)?;
        self.write(bucket, |table| table.remove(key).map(drop).map_err(storage))
    }

    /// `bucket.exists`.
    pub(crate) fn exists(&self, bucket: &str, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        self.read(bucket, |table| match table {
            Some(table) => Ok(table.get(key).map_err(storage)?.is_some()),
            None => Ok(false),
        })
    }

    /// `bucket.list-keys`: the keys in byte order after the first `cursor`, at most
    /// [`LIST_PAGE_KEYS`] of them and fewer if they would not fit in a frame, and the cursor of
    /// the next page (`None` on the last one). The cursor counts the keys already returned.
    pub(crate) fn list_keys(&self, bucket: &str, cursor: Option<u64>) -> Result<(Vec<String>, Option<u64>), KvError> {
        let skip = cursor.unwrap_or(0);
        self.read(bucket, |table| {
            let Some(table) = table else { return Ok((Vec::new(), None)) };
            let total = table.len().map_err(storage)?;
            if skip >= total {
                return Ok((Vec::new(), None));
            }
            // `skip < total`, and a table cannot hold more entries than memory has addresses.
            let skip_entries = usize::try_from(skip).unwrap_or(usize::MAX);
            let mut keys = Vec::new();
            let mut bytes = 0;
            for entry in table.iter().map_err(storage)?.skip(skip_entries) {
                let (key, _) = entry.map_err(storage)?;
                let key = key.value();
                let cost = key.len() + varint_len(key.len());
                if keys.len() == LIST_PAGE_KEYS || (bytes + cost > LIST_PAGE_BYTES && !keys.is_empty()) {
                    break;
                }
                bytes += cost;
                keys.push(key.to_owned());
            }
            let next = skip + keys.len() as u64;
            Ok((keys, (next < total).then_some(next)))
        })
    }

    /// `atomics.increment`: adds `delta` to the counter at `key` (absent counts as 0) and returns
    /// the new value.
    pub(crate) fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, KvError> {
        check_key(key)?;
        self.write(bucket, |table| {
            let current = match table.get(key).map_err(storage)? {
                None => 0,
                Some(value) => parse_counter(value.value()).ok_or_else(|| {
                    KvError::Provider(format!("the value of key {key:?} is not a counter (a decimal u64)"))
                })?,
            };
            let new = current
                .checked_add(delta)
                .ok_or_else(|| KvError::Provider(format!("overflow incrementing the value of key {key:?}")))?;
            table.insert(key, new.to_string().as_bytes()).map_err(storage)?;
            Ok(new)
        })
    }

    /// `batch.get-many`: in request order, present keys with their values.
    pub(crate) fn get_many(&self, bucket: &str, keys: &[&str]) -> Result<Vec<Option<Entry>>, KvError> {
        keys.iter().try_for_each(|key| check_key(key))?;
        self.read(bucket, |table| {
            let Some(table) = table else { return Ok(vec![None; keys.len()]) };
            keys.iter()
                .map(|&key| Ok(table.get(key).map_err(storage)?.map(|v| (key.to_owned(), v.value().to_vec()))))
                .collect()
        })
    }

    /// `batch.set-many`: all or nothing, in one transaction (a key given twice keeps the last value).
    pub(crate) fn set_many(&self, bucket: &str, entries: &[(&str, &[u8])]) -> Result<(), KvError> {
        entries.iter().try_for_each(|(key, _)| check_key(key))?;
        self.write(bucket, |table| {
            entries.iter().try_for_each(|&(key, value)| table.insert(key, value).map(drop).map_err(storage))
        })
    }

    /// `batch.delete-many`: all or nothing, in one transaction.
    pub(crate) fn delete_many(&self, bucket: &str, keys: &[&str]) -> Result<(), KvError> {
        keys.iter().try_for_each(|key| check_key(key))?;
        self.write(bucket, |table| keys.iter().try_for_each(|&key| table.remove(key).map(drop).map_err(storage)))
    }
}

/// A counter's stored value, as wasmtime's reference implementation reads it (`str::parse`).
fn parse_counter(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::TempDir;

    #[test]
    fn varint_lengths_match_postcard() {
        for (n, len) in [(0, 1), (127, 1), (128, 2), (4096, 2), (16_383, 2), (16_384, 3), (usize::MAX, 10)] {
            assert_eq!(varint_len(n), len, "{n}");
        }
    }

    #[test]
    fn identifiers_and_keys_are_checked_before_any_storage() {
        let dir = TempDir::new();
        let kv = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        kv.open_bucket("").unwrap();
        assert!(matches!(kv.open_bucket(&"b".repeat(256)), Err(KvError::BadRequest(_))));
        kv.open_bucket(&"b".repeat(255)).unwrap();
        kv.open_bucket("weird \0 name/../é").unwrap();
        assert!(matches!(kv.get("b", ""), Err(KvError::BadRequest(_))));
        assert!(matches!(kv.set("b", &"k".repeat(4097), b""), Err(KvError::BadRequest(_))));
        kv.set("b", &"k".repeat(4096), b"").unwrap();
        assert!(matches!(kv.set_many("b", &[("ok", b"1"), ("", b"2")]), Err(KvError::BadRequest(_))));
        assert_eq!(kv.get("b", "ok"), Ok(None), "a refused batch writes nothing");
    }

    #[test]
    fn a_failed_increment_writes_nothing() {
        let dir = TempDir::new();
        let kv = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        kv.set("b", "max", u64::MAX.to_string().as_bytes()).unwrap();
        assert!(matches!(kv.increment("b", "max", 1), Err(KvError::Provider(m)) if m.contains("overflow")));
        assert_eq!(kv.get("b", "max").unwrap().unwrap(), u64::MAX.to_string().as_bytes());
        assert_eq!(kv.increment("b", "max", 0), Ok(u64::MAX));
    }
}
