//! The component index: what the artifact cache knows about a component *file*, so that a warm
//! run finds its artifact from one `fstat` and a small read instead of reading, hashing and
//! parsing the whole file (an 18 MB CPython component cost 126 ms that way).
//!
//! An entry is keyed by the file's device and inode and holds the file's identity when it was
//! hashed (device, inode, size, mtime, ctime, each to the nanosecond), its BLAKE3 digest and its
//! top-level imports and exports. A lookup trusts an entry only if the identity is the same now.
//! Writing to a file changes its ctime, and so does restoring its mtime with `utimensat`, and
//! userspace cannot set ctime back, so a changed file never matches its old entry; it is then
//! hashed and parsed again and its entry replaced.
//!
//! Two rules keep a racing writer out: an entry is recorded only if the identity was the same
//! before and after the bytes were read, and only once the file's last change is
//! [`SETTLE`] old, so that a write within the same timestamp tick as the one hashed (filesystem
//! timestamps are coarse) cannot give a changed file its old identity. A file changed moments
//! ago is simply hashed on each run until it settles.
//!
//! Entries are small files in `CACHE/index/`, written to a temporary file and renamed into
//! place; a damaged, foreign or old-format entry reads as a miss.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::inspect::Interfaces;

/// How old a file's last change must be before its identity is trusted to stand for its bytes.
pub const SETTLE: Duration = Duration::from_secs(2);

/// The entry format; a change of it turns old entries into misses.
const ENTRY_MAGIC: &[u8; 8] = b"wvidx\0\0\x02";

/// Entries larger than this are not ours (imports and exports of real components are a few KB).
const MAX_ENTRY: u64 = 1 << 20;

/// A component's content digest: BLAKE3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContentDigest(pub [u8; 32]);

impl ContentDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex.
    pub fn hex(&self) -> String {
        super::aot::hex(&self.0)
    }
}

impl std::fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blake3:{}", self.hex())
    }
}

/// What identifies a file's contents without reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity in `meta` (from `fstat` of the open file).
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file's last change (the later of mtime and ctime) is at least [`SETTLE`]
    /// before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let last = self.mtime.max(self.ctime);
        let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else { return false };
        let now = (now.as_secs() as i64, i64::from(now.subsec_nanos()));
        let settle = SETTLE.as_secs() as i64;
        // (now - last) >= SETTLE, compared as (seconds, nanoseconds) pairs.
        (now.0 - settle, now.1) >= last
    }
}

/// What an entry gives a lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Indexed {
    /// The content digest.
    pub digest: ContentDigest,
    /// The top-level imports and exports.
    pub interfaces: Interfaces,
    /// The file is a wasip1 command module, run as the component the preview 1 adapter makes
    /// of it (the interfaces are that component's).
    pub preview1: bool,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    magic: [u8; 8],
    identity: FileIdentity,
    digest: ContentDigest,
    imports: Vec<String>,
    exports: Vec<String>,
    preview1: bool,
}

fn entry_path(cache_dir: &Path, identity: &FileIdentity) -> PathBuf {
    cache_dir.join("index").join(format!("{:x}-{:x}", identity.dev, identity.ino))
}

/// The entry for the file whose identity is `identity` now, if there is one that matches it.
pub fn lookup(cache_dir: &Path, identity: &FileIdentity) -> Option<Indexed> {
    use std::io::Read;
    let file = std::fs::File::open(entry_path(cache_dir, identity)).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_ENTRY).read_to_end(&mut bytes).ok()?;
    let entry: Entry = postcard::from_bytes(&bytes).ok()?;
    (entry.magic == *ENTRY_MAGIC && entry.identity == *identity).then_some(Indexed {
        digest: entry.digest,
        interfaces: Interfaces { imports: entry.imports, exports: entry.exports },
        preview1: entry.preview1,
    })
}

/// Records that the file with `identity` (the same before and after it was read) has `indexed`
/// contents, if its last change has settled by `now`. Best effort: an index that cannot be
/// written costs the next run a hash, nothing more. Returns whether it was recorded.
pub fn record(cache_dir: &Path, identity: &FileIdentity, indexed: &Indexed, now: SystemTime) -> bool {
    if !identity.settled(now) {
        return false;
    }
    let entry = Entry {
        magic: *ENTRY_MAGIC,
        identity: *identity,
        digest: indexed.digest,
        imports: indexed.interfaces.imports.clone(),
        exports: indexed.interfaces.exports.clone(),
        preview1: indexed.preview1,
    };
    let Ok(bytes) = postcard::to_allocvec(&entry) else { return false };
    let path = entry_path(cache_dir, identity);
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(cache_dir.join("index"))?;
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)
    };
    match write() {
        Ok(()) => true,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(path = %path.display(), "cannot record the component index entry: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("wasmvisor-index-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn identity(path: &Path) -> FileIdentity {
        FileIdentity::of(&std::fs::metadata(path).unwrap())
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    fn indexed(bytes: &[u8]) -> Indexed {
        Indexed {
            digest: ContentDigest::of(bytes),
            interfaces: Interfaces { imports: vec!["wasi:cli/stdout@0.2.0".into()], exports: vec![] },
            preview1: false,
        }
    }

    #[test]
    fn a_recorded_file_is_found_until_it_changes_even_with_its_mtime_restored() {
        let dir = Scratch::new("restored");
        let file = dir.path().join("app.wasm");
        std::fs::write(&file, b"first contents").unwrap();
        let id = identity(&file);
        assert!(lookup(dir.path(), &id).is_none());
        assert!(record(dir.path(), &id, &indexed(b"first contents"), later()));
        assert_eq!(lookup(dir.path(), &identity(&file)), Some(indexed(b"first contents")));

        // Same size, new bytes, mtime put back: the ctime still tells.
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all_at(b"FIRST", 0).unwrap();
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        let changed = identity(&file);
        assert_eq!((changed.size, changed.mtime), (id.size, id.mtime));
        assert!(lookup(dir.path(), &changed).is_none(), "a changed file must not match its old entry");
    }

    #[test]
    fn a_file_changed_moments_ago_is_not_recorded() {
        let dir = Scratch::new("fresh");
        let file = dir.path().join("app.wasm");
        std::fs::write(&file, b"fresh").unwrap();
        let id = identity(&file);
        assert!(!record(dir.path(), &id, &indexed(b"fresh"), SystemTime::now()));
        assert!(lookup(dir.path(), &id).is_none());
        assert!(record(dir.path(), &id, &indexed(b"fresh"), SystemTime::now() + SETTLE));
    }

    #[test]
    fn damaged_or_foreign_entries_are_misses() {
        let dir = Scratch::new("damaged");
        let file = dir.path().join("app.wasm");
        std::fs::write(&file, b"x").unwrap();
        let id = identity(&file);
        assert!(record(dir.path(), &id, &indexed(b"x"), later()));
        let path = entry_path(dir.path(), &id);
        let good = std::fs::read(&path).unwrap();
        for bad in [&b""[..], &good[..good.len() / 2], b"wvidx\0\0\x02 something else"] {
            std::fs::write(&path, bad).unwrap();
            assert!(lookup(dir.path(), &id).is_none());
        }
        let mut other_magic = good.clone();
        other_magic[7] ^= 0xff;
        std::fs::write(&path, other_magic).unwrap();
        assert!(lookup(dir.path(), &id).is_none());
    }
}
