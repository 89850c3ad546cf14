//! The `wasi:filesystem` provider: a tenant's preopened directories, served to one guest
//! connection ([`FsSession`]).
//!
//! Confinement is cap-std's: every path a guest names is resolved beneath the directory
//! handle it is relative to (`openat2` with `RESOLVE_BENEATH` where the kernel has it, and
//! cap-std's own component-by-component walk where it does not), so `..`, absolute paths,
//! absolute symlinks, symlinks that climb out and races on any of them fail rather than escape.
//! No host path string is ever joined. A read-only preopen (and everything opened through it)
//! refuses every change with `not-permitted`, before the host is asked.
//!
//! Handles are per session (per connection): the preopens first, then each open in turn. A
//! handle is only ever looked up in its session's table, so one VM cannot name another's
//! files. Files are kept as `std::fs::File` once cap-std has opened them (positional reads and
//! writes need no path), directories as `cap_std::fs::Dir`.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cap_fs_ext::{DirExt, OpenOptionsFollowExt, OpenOptionsMaybeDirExt, SystemTimeSpec};
use cap_std::fs::{Dir, OpenOptions};
use serde::{Deserialize, Serialize};
use wasmvisor_abi::capability::Request;
use wasmvisor_abi::fs::{
    FS_CHUNK, FS_DIR_PAGE, FS_PLACED_CHUNK, FileType, FsError, Handle, NewTime, Stat, Time, flags, open,
};

/// A directory the tenant's components see, as the spec and `--dir` give it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preopen {
    /// The host directory.
    pub host: PathBuf,
    /// Its name in the guest (`/data`, `.`, ...).
    pub guest: String,
    /// Every change refused.
    pub readonly: bool,
}

/// Reads placed by the provider itself: where the broker runs in the VMM's process
/// (`wasmvisor run --dir`), the file's bytes go from the page cache straight into the guest's
/// buffer, one copy. Elsewhere (the daemon's broker) the bytes are answered and the VMM
/// places them.
pub trait PlaceReads: Send {
    /// Reads `len` bytes of `file` from `offset` into guest buffer `into`, or fewer at the
    /// file's end; returns how many. `None`: `into..into + len` is not a range it can write
    /// (the bytes are then answered instead). `into` and `len` are the guest's: untrusted.
    fn read_at(&mut self, file: &std::fs::File, offset: u64, into: u64, len: usize) -> Option<io::Result<usize>>;
}

/// Reads `len` bytes from `offset` on with `read(filled, at)`, which reads into the buffer's
/// bytes from `filled` to `len` at file offset `at`: whole chunks where the file has them, a
/// short count only at its end. Returns how many bytes came.
pub fn read_full(len: usize, offset: u64, mut read: impl FnMut(usize, u64) -> io::Result<usize>) -> io::Result<usize> {
    let mut filled = 0;
    while filled < len {
        match read(filled, offset.saturating_add(filled as u64)) {
            Ok(0) => break,
            Ok(n) => filled += n.min(len - filled),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What an answer carries, owned.
#[derive(Debug, PartialEq)]
pub(crate) enum FsReply {
    Unit,
    Preopens(Vec<(Handle, String, bool)>),
    Opened(Handle, FileType, Stat),
    Bytes(Vec<u8>),
    Written(u64),
    /// A read's byte count, the bytes already in the guest's buffer ([`PlaceReads`]).
    Placed(u64),
    Stat(Stat),
    Entries(Vec<(String, FileType, (u64, u64))>, Option<u64>),
    Text(String),
    Same(bool),
    Hash(u64, u64),
}

enum Node {
    Dir(Dir),
    File(std::fs::File),
}

struct Open {
    node: Node,
    /// Opened through a read-only preopen.
    readonly: bool,
    /// `descriptor-flags` it may use (read, write).
    can_read: bool,
    can_write: bool,
}

/// One connection's view of the tenant's preopens.
pub struct FsSession {
    open: HashMap<Handle, Open>,
    preopens: Vec<(Handle, String, bool)>,
    next: Handle,
    /// The last read's buffer, given back once its reply is encoded ([`FsSession::recycle`]):
    /// a fresh 960 KiB allocation per read costs its page faults every time.
    spare: Vec<u8>,
    /// Where reads that name a guest buffer go, when this process can write it.
    placer: Option<Box<dyn PlaceReads>>,
}

impl std::fmt::Debug for FsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsSession")
            .field("preopens", &self.preopens)
            .field("open", &self.open.len())
            .field("placed_reads", &self.placer.is_some())
            .finish()
    }
}

/// Most descriptors one session may hold open.
const MAX_OPEN: usize = 1024;

/// `wasi:filesystem`'s error for an I/O error.
pub(crate) fn fs_error(e: &io::Error) -> FsError {
    match e.raw_os_error() {
        Some(libc_errno) => errno(libc_errno),
        None => match e.kind() {
            io::ErrorKind::NotFound => FsError::NoEntry,
            io::ErrorKind::PermissionDenied => FsError::NotPermitted,
            io::ErrorKind::AlreadyExists => FsError::Exist,
            io::ErrorKind::InvalidInput => FsError::Invalid,
            io::ErrorKind::NotADirectory => FsError::NotDirectory,
            io::ErrorKind::IsADirectory => FsError::IsDirectory,
            io::ErrorKind::DirectoryNotEmpty => FsError::NotEmpty,
            io::ErrorKind::ReadOnlyFilesystem => FsError::ReadOnly,
            io::ErrorKind::CrossesDevices => FsError::CrossDevice,
            io::ErrorKind::InvalidFilename => FsError::Invalid,
            _ => FsError::Io,
        },
    }
}

/// Linux errno values and their `error-code`s (the kernel's numbers; no libc needed).
fn errno(n: i32) -> FsError {
    match n {
        1 => FsError::NotPermitted,         // EPERM
        2 => FsError::NoEntry,              // ENOENT
        4 => FsError::Interrupted,          // EINTR
        5 => FsError::Io,                   // EIO
        6 => FsError::NoSuchDevice,         // ENXIO
        9 => FsError::BadDescriptor,        // EBADF
        11 => FsError::WouldBlock,          // EAGAIN
        12 => FsError::InsufficientMemory,  // ENOMEM
        13 => FsError::Access,              // EACCES
        16 => FsError::Busy,                // EBUSY
        17 => FsError::Exist,               // EEXIST
        18 => FsError::CrossDevice,         // EXDEV
        19 => FsError::NoDevice,            // ENODEV
        20 => FsError::NotDirectory,        // ENOTDIR
        21 => FsError::IsDirectory,         // EISDIR
        22 => FsError::Invalid,             // EINVAL
        25 => FsError::NoTty,               // ENOTTY
        26 => FsError::TextFileBusy,        // ETXTBSY
        27 => FsError::FileTooLarge,        // EFBIG
        28 => FsError::InsufficientSpace,   // ENOSPC
        29 => FsError::InvalidSeek,         // ESPIPE
        30 => FsError::ReadOnly,            // EROFS
        31 => FsError::TooManyLinks,        // EMLINK
        32 => FsError::Pipe,                // EPIPE
        35 => FsError::Deadlock,            // EDEADLK
        36 => FsError::NameTooLong,         // ENAMETOOLONG
        37 => FsError::NoLock,              // ENOLCK
        38 => FsError::Unsupported,         // ENOSYS
        39 => FsError::NotEmpty,            // ENOTEMPTY
        40 => FsError::Loop,                // ELOOP
        75 => FsError::Overflow,            // EOVERFLOW
        84 => FsError::IllegalByteSequence, // EILSEQ
        90 => FsError::MessageSize,         // EMSGSIZE
        95 => FsError::Unsupported,         // EOPNOTSUPP
        114 => FsError::Already,            // EALREADY
        115 => FsError::InProgress,         // EINPROGRESS
        122 => FsError::Quota,              // EDQUOT
        131 => FsError::NotRecoverable,     // ENOTRECOVERABLE
        _ => FsError::Io,
    }
}

fn err(e: io::Error) -> FsError {
    fs_error(&e)
}

fn cap_file_type(t: cap_std::fs::FileType) -> FileType {
    use cap_fs_ext::FileTypeExt;
    if t.is_dir() {
        FileType::Directory
    } else if t.is_file() {
        FileType::RegularFile
    } else if t.is_symlink() {
        FileType::SymbolicLink
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else if t.is_char_device() {
        FileType::CharacterDevice
    } else if t.is_fifo() {
        FileType::Fifo
    } else if t.is_socket() {
        FileType::Socket
    } else {
        FileType::Unknown
    }
}

fn time(seconds: i64, nanoseconds: i64) -> Option<Time> {
    Some(Time { seconds: u64::try_from(seconds).ok()?, nanoseconds: u32::try_from(nanoseconds).ok()? })
}

fn cap_stat(m: &cap_std::fs::Metadata) -> Stat {
    use cap_std::fs::MetadataExt;
    Stat {
        kind: cap_file_type(m.file_type()),
        links: m.nlink(),
        size: m.len(),
        accessed: time(m.atime(), m.atime_nsec()),
        modified: time(m.mtime(), m.mtime_nsec()),
        changed: time(m.ctime(), m.ctime_nsec()),
        hash: hash(m.dev(), m.ino()),
    }
}

/// A guest's timestamp as a time, checked: nanoseconds past a second, or a time the host
/// cannot represent, are `invalid` (never a panic).
fn at(t: Time) -> Result<std::time::SystemTime, FsError> {
    if t.nanoseconds >= 1_000_000_000 {
        return Err(FsError::Invalid);
    }
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(t.seconds, t.nanoseconds)).ok_or(FsError::Invalid)
}

fn spec(t: NewTime) -> Result<Option<SystemTimeSpec>, FsError> {
    Ok(match t {
        NewTime::Unchanged => None,
        NewTime::Now => Some(SystemTimeSpec::SymbolicNow),
        NewTime::At(t) => Some(SystemTimeSpec::Absolute(cap_std::time::SystemTime::from_std(at(t)?))),
    })
}

fn std_time(t: NewTime) -> Result<Option<std::time::SystemTime>, FsError> {
    Ok(match t {
        NewTime::Unchanged => None,
        NewTime::Now => Some(std::time::SystemTime::now()),
        NewTime::At(t) => Some(at(t)?),
    })
}

/// A metadata hash of (device, inode) — what identifies an object, as wasmtime's.
fn hash(dev: u64, ino: u64) -> (u64, u64) {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    (dev, ino).hash(&mut h);
    let lower = h.finish();
    (dev, ino, 1u8).hash(&mut h);
    (lower, h.finish())
}

impl FsSession {
    /// Opens the preopens (a directory that does not open is an error naming it).
    pub fn new(preopens: &[Preopen]) -> io::Result<Self> {
        let mut session = Self { open: HashMap::new(), preopens: Vec::new(), next: 0, spare: Vec::new(), placer: None };
        for p in preopens {
            let dir = Dir::open_ambient_dir(&p.host, cap_std::ambient_authority()).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {} for the guest: {e}", p.host.display()))
            })?;
            let handle =
                session.insert(Open { node: Node::Dir(dir), readonly: p.readonly, can_read: true, can_write: false });
            session.preopens.push((handle, p.guest.clone(), p.readonly));
        }
        Ok(session)
    }

    /// The file behind `handle` if it is one this session may read: what a relay hands the
    /// VMM child, so that the child reads it into guest RAM itself.
    pub fn readable_file(&self, handle: Handle) -> Option<&std::fs::File> {
        match self.open.get(&handle)? {
            Open { node: Node::File(file), can_read: true, .. } => Some(file),
            _ => None,
        }
    }

    /// Reads that name a guest buffer (`FsRead { into }`) are placed there by `placer`.
    pub fn place_reads(&mut self, placer: Box<dyn PlaceReads>) {
        self.placer = Some(placer);
    }

    fn insert(&mut self, open: Open) -> Handle {
        let handle = self.next;
        self.next = self.next.wrapping_add(1);
        self.open.insert(handle, open);
        handle
    }

    fn get(&self, handle: Handle) -> Result<&Open, FsError> {
        self.open.get(&handle).ok_or(FsError::BadDescriptor)
    }

    fn dir(&self, handle: Handle) -> Result<(&Dir, bool), FsError> {
        match self.get(handle)? {
            Open { node: Node::Dir(d), readonly, .. } => Ok((d, *readonly)),
            _ => Err(FsError::NotDirectory),
        }
    }

    /// A directory that may be changed.
    fn dir_mut(&self, handle: Handle) -> Result<&Dir, FsError> {
        match self.dir(handle)? {
            (_, true) => Err(FsError::NotPermitted),
            (d, false) => Ok(d),
        }
    }

    fn file(&self, handle: Handle) -> Result<&Open, FsError> {
        match self.get(handle)? {
            o @ Open { node: Node::File(_), .. } => Ok(o),
            _ => Err(FsError::BadDescriptor),
        }
    }

    /// Answers a filesystem request; `None` for any other request.
    pub(crate) fn handle(&mut self, request: &Request<'_>) -> Option<Result<FsReply, FsError>> {
        Some(match *request {
            Request::FsPreopens => Ok(FsReply::Preopens(self.preopens.clone())),
            Request::FsOpenAt { dir, follow, path, open, flags, ref close } => {
                for &handle in close {
                    // A handle already gone is no matter here: the open is what was asked.
                    let _ = self.close(handle);
                }
                self.open_at(dir, follow, path, open, flags)
            }
            Request::FsClose { handle } => self.close(handle),
            Request::FsRead { handle, offset, len, into } => self.read(handle, offset, len, into),
            Request::FsWrite { handle, offset, data } => self.write(handle, offset, data),
            Request::FsStat { handle, at } => self.stat(handle, at),
            Request::FsSetSize { handle, size } => self.set_size(handle, size),
            Request::FsSetTimes { handle, at, accessed, modified } => self.set_times(handle, at, accessed, modified),
            Request::FsSync { handle, data_only } => self.sync(handle, data_only),
            Request::FsReadDir { handle, cursor } => self.read_dir(handle, cursor),
            Request::FsCreateDir { dir, path } => {
                self.dir_mut(dir).and_then(|d| d.create_dir(path).map_err(err)).map(|()| FsReply::Unit)
            }
            Request::FsRemoveDir { dir, path } => {
                self.dir_mut(dir).and_then(|d| d.remove_dir(path).map_err(err)).map(|()| FsReply::Unit)
            }
            Request::FsUnlink { dir, path } => self.unlink(dir, path),
            Request::FsRename { dir, old, new_dir, new } => self.rename(dir, old, new_dir, new),
            Request::FsLink { dir, follow, old, new_dir, new } => self.link(dir, follow, old, new_dir, new),
            Request::FsSymlink { dir, target, path } => self.symlink(dir, target, path),
            Request::FsReadLink { dir, path } => self.read_link(dir, path),
            Request::FsSameObject { a, b } => self.same(a, b),
            Request::FsHash { handle, at } => self.metadata_hash(handle, at),
            _ => return None,
        })
    }

    /// Closes `handle`; a preopen stays open (every instance of the VM starts from it).
    fn close(&mut self, handle: Handle) -> Result<FsReply, FsError> {
        if self.preopens.iter().any(|(h, _, _)| *h == handle) {
            return Ok(FsReply::Unit);
        }
        self.open.remove(&handle).map(|_| FsReply::Unit).ok_or(FsError::BadDescriptor)
    }

    fn open_at(&mut self, dir: Handle, follow: bool, path: &str, oflags: u8, dflags: u8) -> Result<FsReply, FsError> {
        let (parent, readonly) = self.dir(dir)?;
        let create = oflags & open::CREATE != 0;
        let truncate = oflags & open::TRUNCATE != 0;
        let want_write = dflags & flags::WRITE != 0;
        if oflags & open::DIRECTORY != 0 && (create || truncate || oflags & open::EXCLUSIVE != 0) {
            return Err(FsError::Invalid);
        }
        if readonly && (create || truncate || want_write || dflags & flags::MUTATE_DIRECTORY != 0) {
            return Err(FsError::NotPermitted);
        }
        if dflags & (flags::FILE_INTEGRITY_SYNC | flags::DATA_INTEGRITY_SYNC | flags::REQUESTED_WRITE_SYNC) != 0 {
            return Err(FsError::Unsupported);
        }
        if self.open.len() >= MAX_OPEN {
            return Err(FsError::InsufficientMemory);
        }
        let mut opts = OpenOptions::new();
        opts.maybe_dir(true);
        opts.follow(if follow { cap_fs_ext::FollowSymlinks::Yes } else { cap_fs_ext::FollowSymlinks::No });
        if create {
            if oflags & open::EXCLUSIVE != 0 {
                opts.create_new(true);
            } else {
                opts.create(true);
            }
            opts.write(true);
        }
        if truncate {
            opts.truncate(true).write(true);
        }
        // Read unless only writing: the OS then opens what it may, and the flags decide use.
        opts.read(dflags & flags::READ != 0 || !want_write);
        if want_write {
            opts.write(true);
        }
        let file = parent.open_with(path, &opts).map_err(err)?;
        let file = file.into_std();
        let meta = cap_std::fs::Metadata::from_file(&file).map_err(err)?;
        let stat = cap_stat(&meta);
        let kind = stat.kind;
        let node = if meta.is_dir() {
            Node::Dir(Dir::from_std_file(file))
        } else if oflags & open::DIRECTORY != 0 {
            return Err(FsError::NotDirectory);
        } else {
            Node::File(file)
        };
        let can_read = dflags & flags::READ != 0;
        let handle = self.insert(Open { node, readonly, can_read, can_write: want_write || create || truncate });
        Ok(FsReply::Opened(handle, kind, stat))
    }

    /// Takes back a read's buffer once its reply is encoded.
    pub(crate) fn recycle(&mut self, reply: FsReply) {
        if let FsReply::Bytes(buf) = reply {
            self.spare = buf;
        }
    }

    fn read(&mut self, handle: Handle, offset: u64, len: u32, into: Option<u64>) -> Result<FsReply, FsError> {
        let o = self.open.get(&handle).ok_or(FsError::BadDescriptor)?;
        let Node::File(file) = &o.node else { return Err(FsError::IsDirectory) };
        if !o.can_read {
            return Err(FsError::BadDescriptor);
        }
        if let (Some(into), Some(placer)) = (into, self.placer.as_mut()) {
            let want = len.min(FS_PLACED_CHUNK) as usize;
            if let Some(placed) = placer.read_at(file, offset, into, want) {
                return placed.map(|n| FsReply::Placed(n.min(want) as u64)).map_err(err);
            }
        }
        let want = len.min(FS_CHUNK) as usize;
        let mut buf = std::mem::take(&mut self.spare);
        // Grown (zeroed) only where the last read did not reach: whole chunks cost no memset.
        if buf.len() < want {
            buf.resize(want, 0);
        }
        buf.truncate(want);
        let filled = read_full(want, offset, |from, at| file.read_at(&mut buf[from..], at)).map_err(err)?;
        buf.truncate(filled);
        Ok(FsReply::Bytes(buf))
    }

    fn write(&self, handle: Handle, offset: Option<u64>, data: &[u8]) -> Result<FsReply, FsError> {
        let o = self.file(handle)?;
        if o.readonly {
            return Err(FsError::NotPermitted);
        }
        if !o.can_write {
            return Err(FsError::BadDescriptor);
        }
        let Node::File(file) = &o.node else { return Err(FsError::BadDescriptor) };
        if data.len() > FS_CHUNK as usize {
            return Err(FsError::Invalid);
        }
        let at = match offset {
            Some(at) => at,
            // Appends go at the end as it is now (one writer per file is the guest's case).
            None => file.metadata().map_err(err)?.len(),
        };
        file.write_all_at(data, at).map_err(err)?;
        Ok(FsReply::Written(data.len() as u64))
    }

    fn stat(&self, handle: Handle, at: Option<(bool, &str)>) -> Result<FsReply, FsError> {
        match at {
            None => match &self.get(handle)?.node {
                Node::File(f) => cap_std::fs::Metadata::from_file(f).map(|m| FsReply::Stat(cap_stat(&m))).map_err(err),
                Node::Dir(d) => d.dir_metadata().map(|m| FsReply::Stat(cap_stat(&m))).map_err(err),
            },
            Some((follow, path)) => {
                let (dir, _) = self.dir(handle)?;
                let m = if follow { dir.metadata(path) } else { dir.symlink_metadata(path) };
                m.map(|m| FsReply::Stat(cap_stat(&m))).map_err(err)
            }
        }
    }

    fn set_size(&self, handle: Handle, size: u64) -> Result<FsReply, FsError> {
        let o = self.file(handle)?;
        if o.readonly {
            return Err(FsError::NotPermitted);
        }
        // A file not open for writing: the OS says so (`EINVAL`), as under wasmtime.
        let Node::File(file) = &o.node else { return Err(FsError::BadDescriptor) };
        file.set_len(size).map(|()| FsReply::Unit).map_err(err)
    }

    fn set_times(&self, handle: Handle, at: Option<(bool, &str)>, a: NewTime, m: NewTime) -> Result<FsReply, FsError> {
        let o = self.get(handle)?;
        if o.readonly {
            return Err(FsError::NotPermitted);
        }
        match (at, &o.node) {
            (Some((follow, path)), Node::Dir(dir)) => {
                let (a, m) = (spec(a)?, spec(m)?);
                let r = if follow { dir.set_times(path, a, m) } else { dir.set_symlink_times(path, a, m) };
                r.map(|()| FsReply::Unit).map_err(err)
            }
            (Some(_), Node::File(_)) => Err(FsError::NotDirectory),
            (None, node) => {
                let mut times = std::fs::FileTimes::new();
                if let Some(t) = std_time(a)? {
                    times = times.set_accessed(t);
                }
                if let Some(t) = std_time(m)? {
                    times = times.set_modified(t);
                }
                let file = match node {
                    Node::File(f) => f.try_clone().map_err(err)?,
                    Node::Dir(d) => d.try_clone().map_err(err)?.into_std_file(),
                };
                file.set_times(times).map(|()| FsReply::Unit).map_err(err)
            }
        }
    }

    fn sync(&self, handle: Handle, data_only: bool) -> Result<FsReply, FsError> {
        let file = match &self.get(handle)?.node {
            Node::File(f) => f.try_clone().map_err(err)?,
            Node::Dir(d) => d.try_clone().map_err(err)?.into_std_file(),
        };
        let r = if data_only { file.sync_data() } else { file.sync_all() };
        r.map(|()| FsReply::Unit).map_err(err)
    }

    fn read_dir(&self, handle: Handle, cursor: u64) -> Result<FsReply, FsError> {
        let (dir, _) = self.dir(handle)?;
        let skip = usize::try_from(cursor).map_err(|_| FsError::Invalid)?;
        let mut entries = Vec::new();
        let mut budget = (FS_CHUNK / 2) as usize;
        let mut next = None;
        // Each entry's metadata hash, as `metadata-hash-at` (not following it) would give:
        // (device, inode), with the directory's device (an entry that is a mount point would
        // differ; the guest then asks).
        let dev = {
            use cap_std::fs::MetadataExt;
            dir.dir_metadata().map_err(err)?.dev()
        };
        for (i, entry) in dir.entries().map_err(err)?.enumerate().skip(skip) {
            use std::os::unix::fs::DirEntryExt;
            let entry = entry.map_err(err)?;
            let name = entry.file_name().into_string().map_err(|_| FsError::IllegalByteSequence)?;
            if entries.len() == FS_DIR_PAGE as usize || name.len() + 24 > budget {
                next = Some(i as u64);
                break;
            }
            budget -= name.len() + 24;
            let kind = entry.file_type().map(cap_file_type).unwrap_or(FileType::Unknown);
            entries.push((name, kind, hash(dev, entry.ino())));
        }
        Ok(FsReply::Entries(entries, next))
    }

    fn unlink(&self, dir: Handle, path: &str) -> Result<FsReply, FsError> {
        let dir = self.dir_mut(dir)?;
        // A path naming a directory (or ending in `/`) is not unlinked as a file.
        if path.ends_with('/') {
            return Err(match dir.symlink_metadata(path) {
                Ok(m) if m.is_dir() => FsError::IsDirectory,
                Ok(_) => FsError::NotDirectory,
                Err(e) => err(e),
            });
        }
        dir.remove_file_or_symlink(path).map(|()| FsReply::Unit).map_err(err)
    }

    fn rename(&self, dir: Handle, old: &str, new_dir: Handle, new: &str) -> Result<FsReply, FsError> {
        let (from, to) = (self.dir_mut(dir)?, self.dir_mut(new_dir)?);
        from.rename(old, to, new).map(|()| FsReply::Unit).map_err(err)
    }

    fn link(&self, dir: Handle, follow: bool, old: &str, new_dir: Handle, new: &str) -> Result<FsReply, FsError> {
        let (from, to) = (self.dir_mut(dir)?, self.dir_mut(new_dir)?);
        // Linking through a symbolic link is not supported, as under wasmtime.
        if follow {
            return Err(FsError::Invalid);
        }
        from.hard_link(old, to, new).map(|()| FsReply::Unit).map_err(err)
    }

    fn symlink(&self, dir: Handle, target: &str, path: &str) -> Result<FsReply, FsError> {
        let dir = self.dir_mut(dir)?;
        // An absolute target could never be followed inside a preopen: refused, as wasmtime does.
        if Path::new(target).is_absolute() {
            return Err(FsError::NotPermitted);
        }
        dir.symlink(target, path).map(|()| FsReply::Unit).map_err(err)
    }

    fn read_link(&self, dir: Handle, path: &str) -> Result<FsReply, FsError> {
        let (dir, _) = self.dir(dir)?;
        let target = dir.read_link_contents(path).map_err(err)?;
        target.into_os_string().into_string().map(FsReply::Text).map_err(|_| FsError::IllegalByteSequence)
    }

    fn identity(&self, handle: Handle, at: Option<(bool, &str)>) -> Result<(u64, u64), FsError> {
        use cap_std::fs::MetadataExt;
        use std::os::unix::fs::MetadataExt as _;
        match at {
            None => match &self.get(handle)?.node {
                Node::File(f) => f.metadata().map(|m| (m.dev(), m.ino())).map_err(err),
                Node::Dir(d) => d.dir_metadata().map(|m| (MetadataExt::dev(&m), MetadataExt::ino(&m))).map_err(err),
            },
            Some((follow, path)) => {
                let (dir, _) = self.dir(handle)?;
                let m = if follow { dir.metadata(path) } else { dir.symlink_metadata(path) };
                m.map(|m| (MetadataExt::dev(&m), MetadataExt::ino(&m))).map_err(err)
            }
        }
    }

    fn same(&self, a: Handle, b: Handle) -> Result<FsReply, FsError> {
        Ok(FsReply::Same(self.identity(a, None)? == self.identity(b, None)?))
    }

    fn metadata_hash(&self, handle: Handle, at: Option<(bool, &str)>) -> Result<FsReply, FsError> {
        let (dev, ino) = self.identity(handle, at)?;
        let (lower, upper) = hash(dev, ino);
        Ok(FsReply::Hash(lower, upper))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::test_utils::TempDir;

    const RW: u8 = flags::READ | flags::WRITE | flags::MUTATE_DIRECTORY;

    /// A session over `<tmp>/pre` (read-write, handle 0) and `<tmp>/ro` (read-only, handle 1),
    /// with `<tmp>/outside/secret` beside them.
    fn setup() -> (TempDir, FsSession) {
        let tmp = TempDir::new();
        for d in ["pre", "ro", "outside"] {
            fs::create_dir(tmp.path().join(d)).unwrap();
        }
        fs::write(tmp.path().join("outside/secret"), "outside").unwrap();
        fs::write(tmp.path().join("ro/file"), "read-only").unwrap();
        let session = FsSession::new(&[
            Preopen { host: tmp.path().join("pre"), guest: "/data".into(), readonly: false },
            Preopen { host: tmp.path().join("ro"), guest: "/ro".into(), readonly: true },
        ])
        .unwrap();
        (tmp, session)
    }

    fn call(s: &mut FsSession, r: Request<'_>) -> Result<FsReply, FsError> {
        s.handle(&r).expect("a filesystem request")
    }

    fn open(s: &mut FsSession, dir: Handle, path: &str, o: u8, f: u8) -> Result<Handle, FsError> {
        match call(s, Request::FsOpenAt { dir, follow: true, path, open: o, flags: f, close: Vec::new() })? {
            FsReply::Opened(h, _, _) => Ok(h),
            other => panic!("{other:?}"),
        }
    }

    fn read_all(s: &mut FsSession, h: Handle) -> Vec<u8> {
        match call(s, Request::FsRead { handle: h, offset: 0, len: FS_CHUNK, into: None }).unwrap() {
            FsReply::Bytes(b) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dot_dot_and_absolute_paths_never_leave_a_preopen() {
        let (_tmp, mut s) = setup();
        for path in ["../outside/secret", "/etc/passwd", "a/../../outside/secret", "..", "/"] {
            let got = open(&mut s, 0, path, 0, flags::READ);
            assert!(matches!(got, Err(FsError::NotPermitted | FsError::Access | FsError::NoEntry)), "{path}: {got:?}");
        }
        for (path, e) in [("../outside/secret", FsError::NotPermitted), ("/etc", FsError::NotPermitted)] {
            assert_eq!(call(&mut s, Request::FsStat { handle: 0, at: Some((true, path)) }), Err(e), "{path}");
        }
        // `.` and a path that climbs and comes back in are fine.
        fs::create_dir(_tmp.path().join("pre/a")).unwrap();
        assert!(open(&mut s, 0, ".", 0, flags::READ).is_ok());
        assert!(open(&mut s, 0, "a/../a", 0, flags::READ).is_ok());
    }

    #[test]
    fn symlinks_that_point_out_are_not_followed_out() {
        let (tmp, mut s) = setup();
        let outside = tmp.path().join("outside");
        symlink(&outside, tmp.path().join("pre/abs")).unwrap();
        symlink("../outside", tmp.path().join("pre/rel")).unwrap();
        symlink("/etc/passwd", tmp.path().join("pre/passwd")).unwrap();
        for path in ["abs/secret", "rel/secret", "passwd", "abs", "rel"] {
            let got = open(&mut s, 0, path, 0, flags::READ);
            assert!(got.is_err(), "{path} opened: {got:?}");
            assert!(call(&mut s, Request::FsStat { handle: 0, at: Some((true, path)) }).is_err(), "{path}");
        }
        // Creating through a link that points out fails too, and creates nothing outside.
        assert!(open(&mut s, 0, "rel/new", open::CREATE, RW).is_err());
        assert!(!outside.join("new").exists());
        // The link itself may be read, without following it.
        assert_eq!(call(&mut s, Request::FsReadLink { dir: 0, path: "rel" }), Ok(FsReply::Text("../outside".into())));
        // And a guest may not make an absolute one.
        assert_eq!(call(&mut s, Request::FsSymlink { dir: 0, target: "/etc", path: "x" }), Err(FsError::NotPermitted));
    }

    #[test]
    fn hard_links_and_renames_stay_inside() {
        let (tmp, mut s) = setup();
        fs::write(tmp.path().join("pre/mine"), "mine").unwrap();
        let link = |s: &mut FsSession, old: &str, new: &str| {
            call(s, Request::FsLink { dir: 0, follow: false, old, new_dir: 0, new })
        };
        assert!(link(&mut s, "../outside/secret", "stolen").is_err());
        assert!(link(&mut s, "mine", "../outside/planted").is_err());
        assert!(!tmp.path().join("pre/stolen").exists() && !tmp.path().join("outside/planted").exists());
        let rename =
            |s: &mut FsSession, old: &str, new: &str| call(s, Request::FsRename { dir: 0, old, new_dir: 0, new });
        assert!(rename(&mut s, "../outside/secret", "stolen").is_err());
        assert!(rename(&mut s, "mine", "../outside/moved").is_err());
        assert!(rename(&mut s, "mine", "/tmp/moved").is_err());
        assert_eq!(fs::read_to_string(tmp.path().join("outside/secret")).unwrap(), "outside");
        // Within the preopen both work.
        assert_eq!(link(&mut s, "mine", "also"), Ok(FsReply::Unit));
        assert_eq!(rename(&mut s, "also", "renamed"), Ok(FsReply::Unit));
        assert_eq!(fs::read_to_string(tmp.path().join("pre/renamed")).unwrap(), "mine");
        // Renaming into the read-only preopen is refused.
        assert_eq!(
            call(&mut s, Request::FsRename { dir: 0, old: "mine", new_dir: 1, new: "x" }),
            Err(FsError::NotPermitted)
        );
    }

    /// A directory swapped for a symlink to outside, again and again, while the guest opens
    /// through it: every open either finds the inside file or fails; none reads outside.
    #[test]
    fn a_symlink_race_never_reaches_outside() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let (tmp, mut s) = setup();
        let pre = tmp.path().join("pre");
        fs::create_dir(pre.join("d")).unwrap();
        fs::write(pre.join("d/secret"), "inside").unwrap();
        fs::create_dir(pre.join("real")).unwrap();
        fs::write(pre.join("real/secret"), "inside").unwrap();
        let (stop, swaps) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU32::new(0)));
        let swapper = {
            let (stop, swaps, pre, outside) = (stop.clone(), swaps.clone(), pre.clone(), tmp.path().join("outside"));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = fs::remove_file(pre.join("d")).or_else(|_| fs::remove_dir_all(pre.join("d")));
                    if swaps.load(Ordering::Relaxed).is_multiple_of(2) {
                        let _ = symlink(&outside, pre.join("d"));
                    } else {
                        let _ = symlink("real", pre.join("d"));
                    }
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // At least 3,000 opens, and on until the swapper has swapped 500 times (on a loaded
        // machine it may start late), within 30 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (mut inside, mut failed) = (0, 0);
        while (inside + failed < 3000 || swaps.load(Ordering::Relaxed) < 500) && std::time::Instant::now() < deadline {
            match open(&mut s, 0, "d/secret", 0, flags::READ) {
                Ok(h) => {
                    assert_eq!(read_all(&mut s, h), b"inside", "read outside through a racing symlink");
                    call(&mut s, Request::FsClose { handle: h }).unwrap();
                    inside += 1;
                }
                Err(_) => failed += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        let swaps = swaps.load(Ordering::Relaxed);
        assert!(swaps >= 500 && inside + failed >= 3000, "the race ran ({swaps} swaps, {inside} + {failed} opens)");
    }

    #[test]
    fn a_read_only_preopen_refuses_every_change() {
        let (tmp, mut s) = setup();
        let np: Result<FsReply, FsError> = Err(FsError::NotPermitted);
        let denied: Result<Handle, FsError> = Err(FsError::NotPermitted);
        assert_eq!(open(&mut s, 1, "new", open::CREATE, flags::READ | flags::WRITE), denied);
        assert_eq!(open(&mut s, 1, "file", 0, flags::WRITE), denied);
        assert_eq!(open(&mut s, 1, "file", open::TRUNCATE, flags::READ), denied);
        assert_eq!(call(&mut s, Request::FsCreateDir { dir: 1, path: "d" }), np);
        assert_eq!(call(&mut s, Request::FsUnlink { dir: 1, path: "file" }), np);
        assert_eq!(call(&mut s, Request::FsRemoveDir { dir: 1, path: "." }), np);
        assert_eq!(call(&mut s, Request::FsSymlink { dir: 1, target: "file", path: "l" }), np);
        assert_eq!(call(&mut s, Request::FsRename { dir: 1, old: "file", new_dir: 1, new: "f2" }), np);
        assert_eq!(call(&mut s, Request::FsLink { dir: 1, follow: false, old: "file", new_dir: 0, new: "x" }), np);
        let times = NewTime::At(Time { seconds: 1, nanoseconds: 0 });
        assert_eq!(
            call(&mut s, Request::FsSetTimes { handle: 1, at: Some((true, "file")), accessed: times, modified: times }),
            np
        );
        // Reading works, and a file opened for reading cannot be written or resized.
        let h = open(&mut s, 1, "file", 0, flags::READ).unwrap();
        assert_eq!(read_all(&mut s, h), b"read-only");
        assert_eq!(call(&mut s, Request::FsWrite { handle: h, offset: Some(0), data: b"x" }), np);
        assert_eq!(call(&mut s, Request::FsSetSize { handle: h, size: 0 }), np);
        // A directory opened beneath it is read-only too.
        fs::create_dir(tmp.path().join("ro/sub")).unwrap();
        let sub = open(&mut s, 1, "sub", open::DIRECTORY, flags::READ).unwrap();
        assert_eq!(call(&mut s, Request::FsCreateDir { dir: sub, path: "d" }), np);
        assert_eq!(fs::read_to_string(tmp.path().join("ro/file")).unwrap(), "read-only");
        assert_eq!(fs::read_dir(tmp.path().join("ro")).unwrap().count(), 2);
    }

    #[test]
    fn sessions_are_separate_and_closing_a_preopen_keeps_it() {
        let (tmp, mut a) = setup();
        fs::create_dir(tmp.path().join("other")).unwrap();
        fs::write(tmp.path().join("other/theirs"), "theirs").unwrap();
        let mut b =
            FsSession::new(&[Preopen { host: tmp.path().join("other"), guest: "/".into(), readonly: false }]).unwrap();
        fs::write(tmp.path().join("pre/f"), "a's").unwrap();
        let h = open(&mut a, 0, "f", 0, flags::READ).unwrap();
        // b knows neither a's file handle nor a's read-only preopen.
        assert_eq!(
            call(&mut b, Request::FsRead { handle: h, offset: 0, len: 10, into: None }),
            Err(FsError::BadDescriptor)
        );
        assert_eq!(open(&mut b, 1, "file", 0, flags::READ), Err(FsError::BadDescriptor));
        assert_eq!(open(&mut b, 0, "f", 0, flags::READ), Err(FsError::NoEntry));
        // Closing a preopen leaves it usable; closing a file ends its handle.
        assert_eq!(call(&mut a, Request::FsClose { handle: 0 }), Ok(FsReply::Unit));
        assert!(open(&mut a, 0, "f", 0, flags::READ).is_ok());
        assert_eq!(call(&mut a, Request::FsClose { handle: h }), Ok(FsReply::Unit));
        assert_eq!(
            call(&mut a, Request::FsRead { handle: h, offset: 0, len: 1, into: None }),
            Err(FsError::BadDescriptor)
        );
        // An open closes the handles it carries first (not the preopens), and answers with the
        // file's metadata.
        let h2 = open(&mut a, 0, "f", 0, flags::READ).unwrap();
        let req =
            Request::FsOpenAt { dir: 0, follow: true, path: "f", open: 0, flags: flags::READ, close: vec![h2, 0, 999] };
        let FsReply::Opened(h3, FileType::RegularFile, st) = call(&mut a, req).unwrap() else { panic!() };
        assert_eq!((st.size, st.kind), (3, FileType::RegularFile));
        assert_eq!(
            call(&mut a, Request::FsRead { handle: h2, offset: 0, len: 1, into: None }),
            Err(FsError::BadDescriptor)
        );
        assert!(
            matches!(call(&mut a, Request::FsRead { handle: h3, offset: 0, len: 9, into: None }), Ok(FsReply::Bytes(b)) if b == b"a's")
        );
        assert!(open(&mut a, 0, "f", 0, flags::READ).is_ok(), "the preopen stayed open");
    }

    #[test]
    fn hostile_timestamps_are_invalid_not_a_panic() {
        let (tmp, mut s) = setup();
        fs::write(tmp.path().join("pre/f"), "x").unwrap();
        let h = open(&mut s, 0, "f", 0, flags::READ | flags::WRITE).unwrap();
        for t in [Time { seconds: u64::MAX, nanoseconds: 999_999_999 }, Time { seconds: 0, nanoseconds: u32::MAX }] {
            let bad = NewTime::At(t);
            assert_eq!(
                call(&mut s, Request::FsSetTimes { handle: h, at: None, accessed: bad, modified: NewTime::Unchanged }),
                Err(FsError::Invalid)
            );
            let r = call(
                &mut s,
                Request::FsSetTimes { handle: 0, at: Some((true, "f")), accessed: NewTime::Now, modified: bad },
            );
            assert_eq!(r, Err(FsError::Invalid));
        }
        let ok = NewTime::At(Time { seconds: 1_000_000_000, nanoseconds: 5 });
        assert_eq!(
            call(&mut s, Request::FsSetTimes { handle: h, at: None, accessed: ok, modified: ok }),
            Ok(FsReply::Unit)
        );
        assert_eq!(
            fs::metadata(tmp.path().join("pre/f")).unwrap().modified().unwrap(),
            std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 5)
        );
    }

    /// Places reads in a buffer of its own, below address 1 << 30; declines the rest.
    struct Memory(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl PlaceReads for Memory {
        fn read_at(&mut self, file: &std::fs::File, offset: u64, into: u64, len: usize) -> Option<io::Result<usize>> {
            if into >= 1 << 30 {
                return None;
            }
            let mut m = self.0.lock().unwrap();
            m.resize(len, 0);
            Some(read_full(len, offset, |from, at| file.read_at(&mut m[from..], at)))
        }
    }

    #[test]
    fn a_placed_read_goes_to_the_placer_up_to_its_own_cap() {
        let (tmp, mut s) = setup();
        let size = FS_PLACED_CHUNK as usize + 10;
        std::fs::write(tmp.path().join("pre/big"), vec![3u8; size]).unwrap();
        let placed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        s.place_reads(Box::new(Memory(placed.clone())));
        let h = open(&mut s, 0, "big", 0, flags::READ).unwrap();
        let read = |s: &mut FsSession, offset, len, into| call(s, Request::FsRead { handle: h, offset, len, into });
        // Placed: up to FS_PLACED_CHUNK at once, then the rest; only the count is answered.
        assert_eq!(read(&mut s, 0, u32::MAX, Some(0)), Ok(FsReply::Placed(u64::from(FS_PLACED_CHUNK))));
        assert_eq!(placed.lock().unwrap().len(), FS_PLACED_CHUNK as usize);
        assert_eq!(read(&mut s, u64::from(FS_PLACED_CHUNK), u32::MAX, Some(0)), Ok(FsReply::Placed(10)));
        // Declined by the placer, or not asked to be placed: the bytes, at most FS_CHUNK.
        for into in [Some(1 << 30), None] {
            match read(&mut s, 0, u32::MAX, into).unwrap() {
                FsReply::Bytes(b) => assert_eq!(b.len(), FS_CHUNK as usize),
                other => panic!("{other:?}"),
            }
        }
        // The descriptor's rights hold for placed reads too.
        let w = open(&mut s, 0, "big", 0, flags::WRITE).unwrap();
        assert_eq!(
            call(&mut s, Request::FsRead { handle: w, offset: 0, len: 1, into: Some(0) }),
            Err(FsError::BadDescriptor)
        );
    }

    #[test]
    fn reads_writes_and_directory_pages() {
        let (tmp, mut s) = setup();
        let h = open(&mut s, 0, "f", open::CREATE | open::EXCLUSIVE, flags::READ | flags::WRITE).unwrap();
        assert_eq!(open(&mut s, 0, "f", open::CREATE | open::EXCLUSIVE, flags::WRITE), Err(FsError::Exist));
        let big = vec![7u8; FS_CHUNK as usize];
        assert_eq!(
            call(&mut s, Request::FsWrite { handle: h, offset: Some(0), data: &big }),
            Ok(FsReply::Written(FS_CHUNK as u64))
        );
        assert_eq!(call(&mut s, Request::FsWrite { handle: h, offset: None, data: b"end" }), Ok(FsReply::Written(3)));
        assert_eq!(read_all(&mut s, h).len(), FS_CHUNK as usize);
        match call(&mut s, Request::FsRead { handle: h, offset: FS_CHUNK as u64, len: 100, into: None }).unwrap() {
            FsReply::Bytes(b) => assert_eq!(b, b"end"),
            other => panic!("{other:?}"),
        }
        // A read beyond the cap is cut to the cap; past the end is empty.
        match call(&mut s, Request::FsRead { handle: h, offset: 1 << 40, len: u32::MAX, into: None }).unwrap() {
            FsReply::Bytes(b) => assert!(b.is_empty()),
            other => panic!("{other:?}"),
        }
        assert_eq!(open(&mut s, 0, "f", open::DIRECTORY, flags::READ), Err(FsError::NotDirectory));
        // 2,500 entries come in pages, each at most FS_DIR_PAGE, all of them once.
        fs::create_dir(tmp.path().join("pre/many")).unwrap();
        for i in 0..2500 {
            fs::write(tmp.path().join(format!("pre/many/{i}")), "").unwrap();
        }
        let d = open(&mut s, 0, "many", open::DIRECTORY, flags::READ).unwrap();
        let (mut names, mut cursor, mut pages) = (Vec::new(), 0, 0);
        loop {
            let FsReply::Entries(entries, next) = call(&mut s, Request::FsReadDir { handle: d, cursor }).unwrap()
            else {
                panic!()
            };
            assert!(entries.len() <= FS_DIR_PAGE as usize);
            names.extend(entries.into_iter().map(|(n, k, _)| (n, k)));
            pages += 1;
            match next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        assert_eq!(pages, 3);
        names.sort_by(|a, b| a.0.cmp(&b.0));
        names.dedup_by(|a, b| a.0 == b.0);
        assert_eq!(names.len(), 2500);
        assert!(names.iter().all(|(_, k)| *k == FileType::RegularFile));
    }
}
