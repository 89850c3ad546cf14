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
//!
//! A tenant's store may have a quota: the bytes of its keys and values, over all buckets. The
//! usage is kept in the file beside the buckets (table `wasmvisor:meta`), changed in the same
//! transaction as every write, so it is exact across crashes; a store from before the quota
//! existed is counted once when it opens. A write that would take the usage past the quota is
//! refused with an error naming it and writes nothing; writes that shrink the usage always go
//! through.

use std::path::Path;

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, TableHandle,
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
    /// The write would take the store past its quota; nothing was written.
    #[error("{0}")]
    Quota(String),
}

fn storage(err: impl Into<redb::Error>) -> KvError {
    KvError::Provider(format!("key-value storage failed: {}", err.into()))
}

/// A present key with its value, as `get-many` returns it.
pub(crate) type Entry = (String, Vec<u8>);

type Def<'n> = TableDefinition<'n, &'static str, &'static [u8]>;

/// The store's own bookkeeping; no bucket's table name (`bucket:...`) can be it.
const META: TableDefinition<'static, &'static str, u64> = TableDefinition::new("wasmvisor:meta");
/// The key in [`META`] of the bytes of all keys and values.
const USED_BYTES: &str = "used_bytes";

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
    /// Most bytes of keys and values the store may hold; `None`: no limit.
    quota: Option<u64>,
}

/// What a write transaction's operations change in the store's usage.
pub(crate) struct Bucket<'t, 'txn> {
    table: &'t mut Table<'txn, &'static str, &'static [u8]>,
    /// Bytes added (negative: freed) so far.
    delta: i64,
}

impl Bucket<'_, '_> {
    fn insert(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let old = self.table.insert(key, value).map_err(storage)?.map(|v| v.value().len());
        self.delta += match old {
            Some(old) => value.len() as i64 - old as i64,
            None => (key.len() + value.len()) as i64,
        };
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<(), KvError> {
        if let Some(old) = self.table.remove(key).map_err(storage)? {
            self.delta -= (key.len() + old.value().len()) as i64;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.table.get(key).map_err(storage)?.map(|v| v.value().to_vec()))
    }
}

impl KvStore {
    /// Opens, or creates, the database at `path`, holding at most `quota` bytes of keys and
    /// values. Fails with `DatabaseAlreadyOpen` while another handle (in any process) has it open.
    pub(crate) fn open(path: &Path, quota: Option<u64>) -> Result<Self, redb::Error> {
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path)?;
        let store = Self { db, quota };
        store.count_usage_once()?;
        Ok(store)
    }

    /// Changes the quota (a tenant's spec was replaced); what the store holds stays.
    pub(crate) fn set_quota(&mut self, quota: Option<u64>) {
        self.quota = quota;
    }

    /// The bytes of keys and values the store holds.
    #[cfg(test)]
    pub(crate) fn used_bytes(&self) -> Result<u64, KvError> {
        let txn = self.db.begin_read().map_err(storage)?;
        match txn.open_table(META) {
            Ok(meta) => Ok(meta.get(USED_BYTES).map_err(storage)?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(err) => Err(storage(err)),
        }
    }

    /// Records the usage of a store written before usage was kept (or never written): the
    /// sum over every bucket, counted once.
    fn count_usage_once(&self) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        let counted = txn.open_table(META)?.get(USED_BYTES)?.is_some();
        if counted {
            txn.abort()?;
            return Ok(());
        }
        let mut used = 0u64;
        let names: Vec<String> =
            txn.list_tables()?.map(|t| t.name().to_owned()).filter(|n| n.starts_with("bucket:")).collect();
        for name in names {
            let table = txn.open_table(Def::new(&name))?;
            for entry in table.iter()? {
                let (key, value) = entry?;
                used += (key.value().len() + value.value().len()) as u64;
            }
        }
        txn.open_table(META)?.insert(USED_BYTES, used)?;
        txn.commit()?;
        Ok(())
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

    /// Runs `f` on the bucket's table in a write transaction, committed durably with the new
    /// usage if `f` succeeds and the quota holds, and abandoned (nothing written) otherwise.
    fn write<T>(&self, bucket: &str, f: impl FnOnce(&mut Bucket<'_, '_>) -> Result<T, KvError>) -> Result<T, KvError> {
        let name = table_name(bucket)?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(|e| KvError::Provider(e.to_string()))?;
        let (value, delta) = {
            let mut table = txn.open_table(Def::new(&name)).map_err(storage)?;
            let mut bucket = Bucket { table: &mut table, delta: 0 };
            (f(&mut bucket)?, bucket.delta)
        };
        if delta != 0 {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let used = meta.get(USED_BYTES).map_err(storage)?.map_or(0, |v| v.value());
            let new = used.saturating_add_signed(delta);
            if let Some(quota) = self.quota.filter(|&q| delta > 0 && new > q) {
                return Err(KvError::Quota(format!(
                    "the tenant's key-value quota of {quota} bytes would be exceeded: {used} bytes are used and \
                     this write adds {delta}; nothing was written"
                )));
            }
            meta.insert(USED_BYTES, new).map_err(storage)?;
        }
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
        self.write(bucket, |b| b.insert(key, value))
    }

    /// `bucket.delete`: deleting an absent key succeeds.
    pub(crate) fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        check_key(key)?;
        self.write(bucket, |b| b.remove(key))
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
        self.write(bucket, |b| {
            let current = match b.get(key)? {
                None => 0,
                Some(value) => parse_counter(&value).ok_or_else(|| {
                    KvError::Provider(format!("the value of key {key:?} is not a counter (a decimal u64)"))
                })?,
            };
            let new = current
                .checked_add(delta)
                .ok_or_else(|| KvError::Provider(format!("overflow incrementing the value of key {key:?}")))?;
            b.insert(key, new.to_string().as_bytes())?;
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
        self.write(bucket, |b| entries.iter().try_for_each(|&(key, value)| b.insert(key, value)))
    }

    /// `batch.delete-many`: all or nothing, in one transaction.
    pub(crate) fn delete_many(&self, bucket: &str, keys: &[&str]) -> Result<(), KvError> {
        keys.iter().try_for_each(|key| check_key(key))?;
        self.write(bucket, |b| keys.iter().try_for_each(|&key| b.remove(key)))
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
        let kv = KvStore::open(&dir.path().join("kv.redb"), None).unwrap();
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
        let kv = KvStore::open(&dir.path().join("kv.redb"), None).unwrap();
        kv.set("b", "max", u64::MAX.to_string().as_bytes()).unwrap();
        assert!(matches!(kv.increment("b", "max", 1), Err(KvError::Provider(m)) if m.contains("overflow")));
        assert_eq!(kv.get("b", "max").unwrap().unwrap(), u64::MAX.to_string().as_bytes());
        assert_eq!(kv.increment("b", "max", 0), Ok(u64::MAX));
    }

    #[test]
    fn the_quota_counts_keys_and_values_and_refuses_without_writing() {
        let dir = TempDir::new();
        let path = dir.path().join("kv.redb");
        let kv = KvStore::open(&path, Some(100)).unwrap();
        kv.set("b", "k1", &[1; 40]).unwrap(); // 42
        kv.set("other", "k2", &[2; 40]).unwrap(); // 84, across buckets
        assert_eq!(kv.used_bytes(), Ok(84));
        let err = kv.set("b", "k3", &[3; 20]).unwrap_err();
        assert!(
            matches!(&err, KvError::Quota(m) if m.contains("quota of 100 bytes") && m.contains("nothing was written")),
            "{err:?}"
        );
        assert_eq!(kv.get("b", "k3"), Ok(None));
        assert_eq!(kv.used_bytes(), Ok(84));
        // A batch past the quota writes none of its entries.
        assert!(matches!(kv.set_many("b", &[("x", b"1"), ("y", &[0; 30])]), Err(KvError::Quota(_))));
        assert_eq!(kv.get("b", "x"), Ok(None));
        // Replacing a value counts the difference; deleting frees; shrinking always goes through.
        kv.set("b", "k1", &[1; 50]).unwrap(); // 94
        assert_eq!(kv.used_bytes(), Ok(94));
        kv.delete("other", "k2").unwrap(); // 52
        kv.delete("other", "absent").unwrap();
        assert_eq!(kv.used_bytes(), Ok(52));
        assert_eq!(kv.increment("b", "n", 7), Ok(7)); // + "n" + "7" = 54
        assert_eq!(kv.used_bytes(), Ok(54));
        drop(kv);
        // Reopened, the usage is where it was; a smaller quota refuses growth but not deletes.
        let mut kv = KvStore::open(&path, Some(10)).unwrap();
        assert_eq!(kv.used_bytes(), Ok(54));
        assert!(matches!(kv.set("b", "z", b"1"), Err(KvError::Quota(_))));
        kv.delete_many("b", &["n"]).unwrap();
        assert_eq!(kv.used_bytes(), Ok(52));
        kv.set_quota(None);
        kv.set("b", "z", &[0; 1000]).unwrap();
    }

    #[test]
    fn a_store_from_before_usage_was_kept_is_counted_once() {
        let dir = TempDir::new();
        let path = dir.path().join("kv.redb");
        {
            // Written as the earlier format did: buckets only, no bookkeeping table.
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(Def::new("bucket:a")).unwrap().insert("key", &b"value"[..]).unwrap();
            txn.open_table(Def::new("bucket:b")).unwrap().insert("k", &b"v"[..]).unwrap();
            txn.commit().unwrap();
        }
        let kv = KvStore::open(&path, Some(1 << 20)).unwrap();
        assert_eq!(kv.used_bytes(), Ok(10));
        kv.set("a", "key", b"v").unwrap();
        assert_eq!(kv.used_bytes(), Ok(6));
    }
}
