//! Desired state: the components the daemon holds and the tenants it should run, in redb.
//!
//! A component is stored content-addressed: its bytes in `DATA/components/sha256-<hex>.wasm`
//! (written to a temporary file, synced and renamed into place *before* the record commits, so
//! a committed record always has its file), its metadata in the `components` table. A tenant is
//! a name and a [`TenantSpec`] in the `tenants` table, with a generation that every put bumps,
//! so that concurrent puts of one tenant are ordered and the answer says which one won. Every
//! change is one write transaction committed with `Durability::Immediate`: once a call returns,
//! a `kill -9` of the daemon cannot lose it. Specs are JSON with unknown fields refused.
//!
//! A component in use by a tenant cannot be deleted; a tenant cannot name a component the
//! store does not hold. Those checks and the write happen in one transaction.

use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use wasmvisor_providers::{Capability, TenantName};

const COMPONENTS: TableDefinition<&str, &str> = TableDefinition::new("components");
const TENANTS: TableDefinition<&str, &str> = TableDefinition::new("tenants");
const OUTCOMES: TableDefinition<&str, &str> = TableDefinition::new("outcomes");

/// A component's content address: `sha256:<64 hex digits>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^sha256:[0-9a-f]{64}$", example = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("sha256:{hex}"))
    }

    /// The text, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file name its bytes are stored under.
    fn file_name(&self) -> String {
        format!("sha256-{}.wasm", &self.0["sha256:".len()..])
    }
}

impl TryFrom<String> for Digest {
    type Error = StoreError;

    fn try_from(s: String) -> Result<Self, StoreError> {
        let ok = s
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        if ok { Ok(Self(s)) } else { Err(StoreError::BadDigest(s)) }
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a component is for: its kind decides how its tenants run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    /// Exports `wasi:cli/run`: runs to completion as a job.
    Command,
    /// Exports `wasi:http/incoming-handler`: served by the front door.
    Http,
}

/// What the store keeps about a component besides its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentRecord {
    /// Its content address.
    pub digest: Digest,
    /// Command or HTTP.
    pub kind: ComponentKind,
    /// The interfaces it imports.
    pub imports: Vec<String>,
    /// The interfaces it exports.
    #[serde(default)]
    pub exports: Vec<String>,
    /// Its size in bytes.
    pub size: u64,
    /// How long the ahead-of-time compile took when it was uploaded, in milliseconds.
    pub compile_ms: u64,
}

/// What happens when a tenant's VM ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Run once.
    #[default]
    Never,
    /// Run again after a failure or a non-zero exit.
    OnFailure,
    /// Run again whenever it ends.
    Always,
}

/// A tenant's desired state, as the API takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// The component it runs.
    pub component: Digest,
    /// Its arguments (after argv[0]).
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// The capabilities granted: `logging`, `config`, `keyvalue`, `http-outgoing`, `filesystem`.
    #[serde(default)]
    #[schema(value_type = Vec<String>, example = json!(["keyvalue"]))]
    pub grants: std::collections::BTreeSet<Capability>,
    /// Its `wasi:config` pairs.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Wall-clock limit of one run, in seconds; for an HTTP tenant, of one request (past it
    /// the front door answers 504 and stops that VM).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// What follows the end of a run (command tenants).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// HTTP tenants: the hostnames routed to it besides `NAME.localhost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// HTTP tenants: how many VMs serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Instances>,
    /// HTTP tenants: seconds a VM above `instances.min` may stay idle before it stops
    /// (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// With the `http-outgoing` grant: the hosts its outgoing requests may reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_outgoing: Option<HttpOutgoing>,
    /// What its storage may hold (defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    /// What each of its VMs' processes may use (defaults when absent); its memory limit is
    /// `memory_mib` plus the VMM's overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ProcessLimits>,
    /// With the `filesystem` grant: directories its components see through
    /// `wasi:filesystem`, under the daemon's `--dirs-root`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<DirSpec>,
}

/// A preopened directory of a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DirSpec {
    /// The directory, relative to the daemon's `--dirs-root` (no `..`; symbolic links may
    /// not lead out of the root).
    #[schema(example = "tenant-a/data")]
    pub host: String,
    /// Its name in the guest, e.g. `/data`.
    #[schema(example = "/data")]
    pub guest: String,
    /// Every change refused (`not-permitted`).
    #[serde(default)]
    pub readonly: bool,
}

/// The limits of a tenant's VM processes (each in a cgroup of its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessLimits {
    /// CPU time per VM in thousandths of a core (default 1000: one core), from 10 to 64000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Most processes and threads per VM (default 32), from 8 to 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// A tenant's storage quotas, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Most bytes of keys and values its key-value store may hold, over all buckets (default
    /// 64 MiB). A write past it fails, naming the quota, and writes nothing; deletes always
    /// go through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyvalue_bytes: Option<u64>,
    /// Most bytes its log keeps on disk (default: twice the daemon's `--log-limit-mib`):
    /// `tenant.log` is rotated to `tenant.log.1` at half of it, and the oldest half dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
}

/// The key-value quota when a spec does not set one.
pub const DEFAULT_KEYVALUE_QUOTA: u64 = 64 << 20;

impl TenantSpec {
    /// Whether its components see preopened directories.
    pub fn has_dirs(&self) -> bool {
        !self.dirs.is_empty() && self.grants.contains(&Capability::Filesystem)
    }

    /// CPU time per VM, in thousandths of a core.
    pub fn cpu_millis(&self) -> u32 {
        self.limits.and_then(|l| l.cpu_millis).unwrap_or(1000)
    }

    /// Most processes and threads per VM.
    pub fn pids_max(&self) -> u32 {
        self.limits.and_then(|l| l.pids).unwrap_or(32)
    }

    /// Its key-value quota.
    pub fn keyvalue_quota(&self) -> u64 {
        self.quotas.and_then(|q| q.keyvalue_bytes).unwrap_or(DEFAULT_KEYVALUE_QUOTA)
    }

    /// Its log's rotation size, given the daemon's default rotation size.
    pub fn log_rotation(&self, default: u64) -> u64 {
        self.quotas.and_then(|q| q.log_bytes).map_or(default, |bytes| (bytes / 2).max(1))
    }
}

/// Where a tenant's outgoing HTTP requests may go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpOutgoing {
    /// `host` (on the scheme's default port) or `host:port`, e.g. `api.example.com`,
    /// `127.0.0.1:9000`; nothing else is reachable.
    #[serde(default)]
    #[schema(example = json!(["api.example.com", "127.0.0.1:9000"]))]
    pub allow: Vec<String>,
}

/// Where an HTTP tenant is reached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Hostnames (lowercase, optionally with `:port`) whose requests go to this tenant, besides
    /// `NAME.localhost`; `*` takes every host no other tenant has.
    #[serde(default)]
    #[schema(example = json!(["api.example.com"]))]
    pub hosts: Vec<String>,
}

/// How many VMs serve an HTTP tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Instances {
    /// VMs kept running even when idle (default 0: scale to zero).
    #[serde(default)]
    pub min: u32,
    /// Most VMs at once (default 1); a request finding all busy waits in the queue.
    #[serde(default = "default_max_instances")]
    pub max: u32,
    /// Most requests waiting for a VM (default 64); past it the answer is 503 with `Retry-After`.
    #[serde(default = "default_queue")]
    pub queue: u32,
}

impl Default for Instances {
    fn default() -> Self {
        Self { min: 0, max: default_max_instances(), queue: default_queue() }
    }
}

fn default_max_instances() -> u32 {
    1
}

fn default_queue() -> u32 {
    64
}

/// Guest RAM of a tenant whose spec names none, in MiB (the size pooled VMs are pre-booted with).
pub const DEFAULT_MEMORY_MIB: u64 = 128;

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

fn default_timeout_s() -> u64 {
    30
}

/// A tenant as stored: its spec and the generation of the put that wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    /// The tenant's name.
    #[schema(value_type = String)]
    pub name: TenantName,
    /// 1 for the first put, then one more for each replacement.
    pub generation: u64,
    /// The desired state.
    pub spec: TenantSpec,
}

/// How a tenant's run ended, recorded so that a restarted daemon knows which runs are done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The generation of the spec that ran.
    pub generation: u64,
    /// The guest's exit code, if it exited.
    pub exit_code: Option<u8>,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// When it ended (RFC 3339).
    pub ended_at: String,
}

impl Outcome {
    /// Whether the run succeeded (exit code 0).
    pub fn succeeded(&self) -> bool {
        self.failure.is_none() && self.exit_code == Some(0)
    }
}

/// Whether a put created or replaced its tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// A new tenant (generation 1).
    Created,
    /// A replacement, with the new generation.
    Replaced(u64),
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not `sha256:<64 lowercase hex digits>`.
    #[error("{0:?} is not a component digest (expected sha256:<64 hex digits>)")]
    BadDigest(String),
    /// A tenant names a component the store does not hold.
    #[error("no component {0}")]
    UnknownComponent(Digest),
    /// A component a tenant still runs.
    #[error("component {digest} is in use by tenant {tenant}")]
    InUse {
        /// The component.
        digest: Digest,
        /// A tenant that uses it.
        tenant: TenantName,
    },
    /// The state database.
    #[error("state store {path}: {why}")]
    Db {
        /// Its file.
        path: PathBuf,
        /// redb's message.
        why: String,
    },
    /// A component file.
    #[error("component file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A record that does not parse (the file was changed behind the daemon's back).
    #[error("damaged record {key:?} in the state store: {why}")]
    Damaged {
        /// Its key.
        key: String,
        /// The parser's message.
        why: String,
    },
}

/// The daemon's desired state under a data directory.
pub struct Store {
    db: Database,
    path: PathBuf,
    components_dir: PathBuf,
}

impl Store {
    /// Opens (creating) `data_dir/daemon/state.redb` and `data_dir/components/`. A second
    /// daemon on the same data directory is refused (redb locks the file).
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("daemon");
        let components_dir = data_dir.join("components");
        for d in [&dir, &components_dir] {
            std::fs::create_dir_all(d).map_err(|source| StoreError::File { path: d.clone(), source })?;
        }
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| StoreError::Db { path: path.clone(), why: e.to_string() })?;
        let store = Self { db, path, components_dir };
        // Create the tables, so that readers never find them missing.
        store.write(|txn| {
            txn.open_table(COMPONENTS)?;
            txn.open_table(TENANTS)?;
            txn.open_table(OUTCOMES)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn db_err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db { path: self.path.clone(), why: e.to_string() }
    }

    /// Runs `f` in one write transaction committed durably; nothing is written if it fails.
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, TxnError>) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.db_err(e))?;
        let out = match f(&txn) {
            Ok(out) => out,
            Err(TxnError::Store(e)) => return Err(e),
            Err(TxnError::Db(e)) => return Err(self.db_err(e)),
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }

    /// The record under `key` in `table`, if any.
    fn get<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let value = table.get(key).map_err(|e| self.db_err(e))?;
        value.map(|v| parse(key, v.value())).transpose()
    }

    /// Every record of `table`, in key order.
    fn list<T: serde::de::DeserializeOwned>(&self, table: TableDefinition<&str, &str>) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            out.push(parse(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Where a component's bytes are.
    pub fn component_path(&self, digest: &Digest) -> PathBuf {
        self.components_dir.join(digest.file_name())
    }

    /// Stores a component (idempotent: the same bytes give the same digest and one file).
    /// `describe` gives its record once its file is in place (the caller inspects and
    /// compiles it there); an error from it stores nothing.
    pub fn put_component<E>(
        &self,
        bytes: &[u8],
        describe: impl FnOnce(&Digest, &Path) -> Result<ComponentRecord, E>,
    ) -> Result<Result<ComponentRecord, E>, StoreError> {
        let digest = Digest::of(bytes);
        let path = self.component_path(&digest);
        let file_err = |source| StoreError::File { path: path.clone(), source };
        if !path.is_file() {
            let tmp = self.components_dir.join(format!(".{}.{}.tmp", digest.file_name(), std::process::id()));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            if let Err(e) = write() {
                let _ = std::fs::remove_file(&tmp);
                return Err(file_err(e));
            }
        }
        let record = match describe(&digest, &path) {
            Ok(r) => r,
            Err(e) => {
                // Not a component we keep; its file goes unless a record already uses it.
                if self.component(&digest)?.is_none() {
                    let _ = std::fs::remove_file(&path);
                }
                return Ok(Err(e));
            }
        };
        let json = serde_json::to_string(&record).expect("records serialize");
        self.write(|txn| {
            txn.open_table(COMPONENTS)?.insert(digest.as_str(), json.as_str())?;
            Ok(())
        })?;
        Ok(Ok(record))
    }

    /// The record of `digest`, if the store holds it.
    pub fn component(&self, digest: &Digest) -> Result<Option<ComponentRecord>, StoreError> {
        self.get(COMPONENTS, digest.as_str())
    }

    /// Every component, by digest.
    pub fn components(&self) -> Result<Vec<ComponentRecord>, StoreError> {
        self.list(COMPONENTS)
    }

    /// Deletes a component no tenant uses; `Ok(false)` if the store did not hold it.
    pub fn delete_component(&self, digest: &Digest) -> Result<bool, StoreError> {
        let removed = self.write(|txn| {
            let tenants = txn.open_table(TENANTS)?;
            for entry in tenants.iter()? {
                let (k, v) = entry?;
                let record: TenantRecord = parse(k.value(), v.value())?;
                if record.spec.component == *digest {
                    return Err(TxnError::Store(StoreError::InUse { digest: digest.clone(), tenant: record.name }));
                }
            }
            drop(tenants);
            let removed = txn.open_table(COMPONENTS)?.remove(digest.as_str())?.is_some();
            Ok(removed)
        })?;
        if removed {
            let path = self.component_path(digest);
            std::fs::remove_file(&path).map_err(|source| StoreError::File { path, source })?;
        }
        Ok(removed)
    }

    /// Creates or replaces a tenant; its component must be in the store. Concurrent puts of
    /// one tenant are serialised by redb's single writer: each gets its own generation.
    pub fn put_tenant(&self, name: &TenantName, spec: TenantSpec) -> Result<(Put, TenantRecord), StoreError> {
        self.write(|txn| {
            if txn.open_table(COMPONENTS)?.get(spec.component.as_str())?.is_none() {
                return Err(TxnError::Store(StoreError::UnknownComponent(spec.component.clone())));
            }
            let mut tenants = txn.open_table(TENANTS)?;
            let previous = match tenants.get(name.as_str())? {
                Some(v) => Some(parse::<TenantRecord>(name.as_str(), v.value())?.generation),
                None => None,
            };
            let generation = previous.map_or(1, |g| g + 1);
            let record = TenantRecord { name: name.clone(), generation, spec };
            let json = serde_json::to_string(&record).expect("records serialize");
            tenants.insert(name.as_str(), json.as_str())?;
            let put = if previous.is_some() { Put::Replaced(generation) } else { Put::Created };
            Ok((put, record))
        })
    }

    /// A tenant's record.
    pub fn tenant(&self, name: &TenantName) -> Result<Option<TenantRecord>, StoreError> {
        self.get(TENANTS, name.as_str())
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        self.list(TENANTS)
    }

    /// Deletes a tenant's record and its outcome; `Ok(false)` if there was none.
    pub fn delete_tenant(&self, name: &TenantName) -> Result<bool, StoreError> {
        self.write(|txn| {
            txn.open_table(OUTCOMES)?.remove(name.as_str())?;
            Ok(txn.open_table(TENANTS)?.remove(name.as_str())?.is_some())
        })
    }

    /// Records how a tenant's run ended, if the tenant is still at that generation (a run of
    /// a replaced or deleted spec records nothing); returns whether it was recorded.
    pub fn put_outcome(&self, name: &TenantName, outcome: &Outcome) -> Result<bool, StoreError> {
        let json = serde_json::to_string(outcome).expect("outcomes serialize");
        self.write(|txn| {
            let current = match txn.open_table(TENANTS)?.get(name.as_str())? {
                Some(v) => parse::<TenantRecord>(name.as_str(), v.value())?.generation,
                None => return Ok(false),
            };
            if current != outcome.generation {
                return Ok(false);
            }
            txn.open_table(OUTCOMES)?.insert(name.as_str(), json.as_str())?;
            Ok(true)
        })
    }

    /// How the tenant's last recorded run ended.
    pub fn outcome(&self, name: &TenantName) -> Result<Option<Outcome>, StoreError> {
        self.get(OUTCOMES, name.as_str())
    }
}

/// An error inside a write transaction: the store's own refusal, or redb's.
enum TxnError {
    Store(StoreError),
    Db(String),
}

impl From<StoreError> for TxnError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for TxnError {
            fn from(e: $t) -> Self {
                Self::Db(e.to_string())
            }
        }
    )*};
}
db_errors!(redb::TableError, redb::StorageError, redb::CommitError, redb::TransactionError);

fn parse<T: serde::de::DeserializeOwned>(key: &str, json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Damaged { key: key.to_owned(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("wasmvisor-store-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(digest: &Digest) -> ComponentRecord {
        ComponentRecord {
            digest: digest.clone(),
            kind: ComponentKind::Command,
            imports: vec![],
            exports: vec!["wasi:cli/run@0.2.0".into()],
            size: 4,
            compile_ms: 1,
        }
    }

    fn spec(component: &Digest) -> TenantSpec {
        serde_json::from_value(serde_json::json!({ "component": component.as_str() })).unwrap()
    }

    fn put(store: &Store, bytes: &[u8]) -> Digest {
        store.put_component(bytes, |d, _| Ok::<_, ()>(record(d))).unwrap().unwrap().digest
    }

    #[test]
    fn state_survives_reopening_and_puts_are_generations() {
        let dir = TempDir::new("reopen");
        let name: TenantName = "alice".parse().unwrap();
        let digest = {
            let store = Store::open(&dir.0).unwrap();
            let digest = put(&store, b"\0asm");
            assert_eq!(put(&store, b"\0asm"), digest, "content-addressed");
            assert_eq!(store.put_tenant(&name, spec(&digest)).unwrap().0, Put::Created);
            assert_eq!(store.put_tenant(&name, spec(&digest)).unwrap().0, Put::Replaced(2));
            digest
        };
        let store = Store::open(&dir.0).unwrap();
        assert_eq!(store.components().unwrap(), [record(&digest)]);
        assert_eq!(std::fs::read(store.component_path(&digest)).unwrap(), b"\0asm");
        let t = store.tenant(&name).unwrap().unwrap();
        assert_eq!(
            (t.generation, t.spec.memory_mib, t.spec.timeout_s, t.spec.restart),
            (2, 128, 30, RestartPolicy::Never)
        );
        assert!(store.delete_tenant(&name).unwrap());
        assert!(!store.delete_tenant(&name).unwrap());
        assert!(store.tenants().unwrap().is_empty());
    }

    #[test]
    fn refusals_change_nothing() {
        let dir = TempDir::new("refusals");
        let store = Store::open(&dir.0).unwrap();
        let name: TenantName = "bob".parse().unwrap();
        let missing = Digest::of(b"never stored");
        assert!(matches!(store.put_tenant(&name, spec(&missing)), Err(StoreError::UnknownComponent(_))));
        assert!(store.tenant(&name).unwrap().is_none());
        let digest = put(&store, b"component");
        store.put_tenant(&name, spec(&digest)).unwrap();
        let err = store.delete_component(&digest).unwrap_err();
        assert_eq!(err.to_string(), format!("component {digest} is in use by tenant bob"));
        assert!(store.component(&digest).unwrap().is_some() && store.component_path(&digest).is_file());
        // A component its describer refuses leaves no file and no record.
        let refused = store.put_component(b"not wasm", |_, _| Err("not a component")).unwrap();
        assert_eq!(refused, Err("not a component"));
        assert!(!store.component_path(&Digest::of(b"not wasm")).exists());
        assert_eq!(store.components().unwrap().len(), 1);
        // Once unused, it goes, file and all.
        store.delete_tenant(&name).unwrap();
        assert!(store.delete_component(&digest).unwrap());
        assert!(!store.component_path(&digest).exists());
        // A second store on the same data directory is refused while the first is open.
        assert!(matches!(Store::open(&dir.0), Err(StoreError::Db { .. })));
    }

    #[test]
    fn specs_refuse_unknown_fields_and_bad_values() {
        let digest = Digest::of(b"x");
        let bad = [
            serde_json::json!({ "component": digest.as_str(), "memroy_mib": 64 }),
            serde_json::json!({ "component": "sha256:abc" }),
            serde_json::json!({ "component": digest.as_str(), "grants": ["network"] }),
            serde_json::json!({ "component": digest.as_str(), "restart": "sometimes" }),
            serde_json::json!({ "args": [] }),
        ];
        for value in bad {
            assert!(serde_json::from_value::<TenantSpec>(value.clone()).is_err(), "{value}");
        }
        let ok: TenantSpec = serde_json::from_value(serde_json::json!({
            "component": digest.as_str(), "grants": ["keyvalue"], "restart": "on-failure", "env": {"A": "1"}
        }))
        .unwrap();
        assert!(ok.grants.contains(&Capability::KeyValue) && ok.restart == RestartPolicy::OnFailure);
        assert!(Digest::try_from(format!("sha256:{}", "A".repeat(64))).is_err(), "lowercase only");
    }

    #[test]
    fn concurrent_puts_of_one_tenant_each_get_a_generation() {
        let dir = TempDir::new("concurrent");
        let store = std::sync::Arc::new(Store::open(&dir.0).unwrap());
        let digest = put(&store, b"c");
        let name: TenantName = "carol".parse().unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (store, name, digest) = (store.clone(), name.clone(), digest.clone());
                std::thread::spawn(move || store.put_tenant(&name, spec(&digest)).unwrap().1.generation)
            })
            .collect();
        let mut gens: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        gens.sort_unstable();
        assert_eq!(gens, (1..=8).collect::<Vec<_>>());
        assert_eq!(store.tenant(&name).unwrap().unwrap().generation, 8, "the last committed wins");
    }

    #[test]
    fn outcomes_are_kept_for_the_current_generation_only() {
        let dir = TempDir::new("outcomes");
        let store = Store::open(&dir.0).unwrap();
        let digest = store.put_component(b"\0asm", |d, _| Ok::<_, ()>(record(d))).unwrap().unwrap().digest;
        let name: TenantName = "t".parse().unwrap();
        let outcome = |generation| Outcome { generation, exit_code: Some(0), failure: None, ended_at: "now".into() };
        assert!(!store.put_outcome(&name, &outcome(1)).unwrap(), "no tenant, no outcome");
        store.put_tenant(&name, spec(&digest)).unwrap();
        assert!(store.put_outcome(&name, &outcome(1)).unwrap());
        store.put_tenant(&name, spec(&digest)).unwrap();
        assert!(!store.put_outcome(&name, &outcome(1)).unwrap(), "a replaced spec's run records nothing");
        assert_eq!(store.outcome(&name).unwrap(), Some(outcome(1)));
        assert!(store.put_outcome(&name, &outcome(2)).unwrap());
        drop(store);
        let store = Store::open(&dir.0).unwrap();
        assert!(store.outcome(&name).unwrap().unwrap().succeeded());
        store.delete_tenant(&name).unwrap();
        assert_eq!(store.outcome(&name).unwrap(), None);
    }
}
