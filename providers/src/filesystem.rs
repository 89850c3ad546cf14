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
use wasmvisor_abi::fs::{FS_CHUNK, FS_DIR_PAGE, FileType, FsError, Handle, NewTime, Stat, Time, flags, open};

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

/// What an answer carries, owned.
#[derive(Debug, PartialEq)]
pub(crate) enum FsReply {
    Unit,
    Preopens(Vec<(Handle, String, bool)>),
    Opened(Handle, FileType),
    Bytes(Vec<u8>),
    Written(u64),
    Stat(Stat),
    Entries(Vec<(String, FileType)>, Option<u64>),
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
}

impl std::fmt::Debug for FsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsSession").field("preopens", &self.preopens).field("open", &self.open.len()).finish()
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
            io::ErrorKind::FilesystemLoop => FsError::Loop,
            io::ErrorKind::InvalidFilename => FsError::Invalid,
            _ => FsError::Io,
        },
    }
}

/// Linux errno values and their `error-code`s (the kernel's numbers; no libc needed).
fn errno(n: i32) -> FsError {
    match n {
        1 => FsError::NotPermitted,        // EPERM
        2 => FsError::NoEntry,             // ENOENT
        4 => FsError::Interrupted,         // EINTR
        5 => FsError::Io,                  // EIO
        6 => FsError::NoSuchDevice,        // ENXIO
        9 => FsError::BadDescriptor,       // EBADF
        11 => FsError::WouldBlock,         // EAGAIN
        12 => FsError::InsufficientMemory, // ENOMEM
        13 => FsError::Access,             // EACCES
        16 => FsError::Busy,               // EBUSY
        17 => FsError::Exist,              // EEXIST
        18 => FsError::CrossDevice,        // EXDEV
        19 => FsError::NoDevice,           // ENODEV
        20 => FsError::NotDirectory,       // ENOTDIR
        21 => FsError::IsDirectory,        // EISDIR
        22 => FsError::Invalid,            // EINVAL
        25 => FsError::NoTty,              // ENOTTY
        26 => FsError::TextFileBusy,       // ETXTBSY
        27 => FsError::FileTooLarge,       // EFBIG
        28 => FsError::InsufficientSpace,  // ENOSPC
        29 => FsError::InvalidSeek,        // ESPIPE
        30 => FsError::ReadOnly,           // EROFS
        31 => FsError::TooManyLinks,       // EMLINK
        32 => FsError::Pipe,               // EPIPE
        35 => FsError::Deadlock,           // EDEADLK
        36 => FsError::NameTooLong,        // ENAMETOOLONG
        37 => FsError::NoLock,             // ENOLCK
        38 => FsError::Unsupported,        // ENOSYS
        39 => FsError::NotEmpty,           // ENOTEMPTY
        40 => FsError::Loop,               // ELOOP
        75 => FsError::Overflow,           // EOVERFLOW
        84 => FsError::IllegalByteSequence, // EILSEQ
        90 => FsError::MessageSize,        // EMSGSIZE
        95 => FsError::Unsupported,        // EOPNOTSUPP
        114 => FsError::Already,           // EALREADY
        115 => FsError::InProgress,        // EINPROGRESS
        122 => FsError::Quota,             // EDQUOT
        131 => FsError::NotRecoverable,    // ENOTRECOVERABLE
        _ => FsError::Io,
    }
}

fn err(e: io::Error) -> FsError {
    fs_error(&e)
}

fn file_type(t: std::fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
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

fn std_stat(m: &std::fs::Metadata) -> Stat {
    use std::os::unix::fs::MetadataExt;
    Stat {
        kind: file_type(m.file_type()),
        links: m.nlink(),
        size: m.len(),
        accessed: time(m.atime(), m.atime_nsec()),
        modified: time(m.mtime(), m.mtime_nsec()),
        changed: time(m.ctime(), m.ctime_nsec()),
    }
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
    }
}

fn spec(t: NewTime) -> Option<SystemTimeSpec> {
    match t {
        NewTime::Unchanged => None,
        NewTime::Now => Some(SystemTimeSpec::SymbolicNow),
        NewTime::At(t) => Some(SystemTimeSpec::Absolute(cap_std::time::SystemTime::from_std(
            std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds, t.nanoseconds),
        ))),
    }
}

fn std_time(t: NewTime) -> Option<std::time::SystemTime> {
    match t {
        NewTime::Unchanged => None,
        NewTime::Now => Some(std::time::SystemTime::now()),
        NewTime::At(t) => std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(t.seconds, t.nanoseconds)),
    }
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
        let mut session = Self { open: HashMap::new(), preopens: Vec::new(), next: 0 };
        for p in preopens {
            let dir = Dir::open_ambient_dir(&p.host, cap_std::ambient_authority())
                .map_err(|e| io::Error::new(e.kind(), format!("cannot open {} for the guest: {e}", p.host.display())))?;
            let handle = session.insert(Open { node: Node::Dir(dir), readonly: p.readonly, can_read: true, can_write: false });
            session.preopens.push((handle, p.guest.clone(), p.readonly));
        }
        Ok(session)
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
            Request::FsOpenAt { dir, follow, path, open, flags } => self.open_at(dir, follow, path, open, flags),
            Request::FsClose { handle } => self.open.remove(&handle).map(|_| FsReply::Unit).ok_or(FsError::BadDescriptor),
            Request::FsRead { handle, offset, len } => self.read(handle, offset, len),
            Request::FsWrite { handle, offset, data } => self.write(handle, offset, data),
            Request::FsStat { handle, at } => self.stat(handle, at),
            Request::FsSetSize { handle, size } => self.set_size(handle, size),
            Request::FsSetTimes { handle, at, accessed, modified } => self.set_times(handle, at, accessed, modified),
            Request::FsSync { handle, data_only } => self.sync(handle, data_only),
            Request::FsReadDir { handle, cursor } => self.read_dir(handle, cursor),
            Request::FsCreateDir { dir, path } => self.dir_mut(dir).and_then(|d| d.create_dir(path).map_err(err)).map(|()| FsReply::Unit),
            Request::FsRemoveDir { dir, path } => self.dir_mut(dir).and_then(|d| d.remove_dir(path).map_err(err)).map(|()| FsReply::Unit),
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
        let meta = file.metadata().map_err(err)?;
        let kind = file_type(meta.file_type());
        let node = if meta.is_dir() {
            Node::Dir(Dir::from_std_file(file))
        } else if oflags & open::DIRECTORY != 0 {
            return Err(FsError::NotDirectory);
        } else {
            Node::File(file)
        };
        let can_read = dflags & flags::READ != 0;
        let handle = self.insert(Open { node, readonly, can_read, can_write: want_write || create || truncate });
        Ok(FsReply::Opened(handle, kind))
    }

    fn read(&self, handle: Handle, offset: u64, len: u32) -> Result<FsReply, FsError> {
        let o = self.get(handle)?;
        let Node::File(file) = &o.node else { return Err(FsError::IsDirectory) };
        if !o.can_read {
            return Err(FsError::BadDescriptor);
        }
        let mut buf = vec![0u8; len.min(FS_CHUNK) as usize];
        let mut filled = 0;
        // Whole chunks where the file has them: a short read only at its end.
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset.saturating_add(filled as u64)) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        }
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
                Node::File(f) => f.metadata().map(|m| FsReply::Stat(std_stat(&m))).map_err(err),
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
        if !o.can_write {
            return Err(FsError::BadDescriptor);
        }
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
                let r = if follow { dir.set_times(path, spec(a), spec(m)) } else { dir.set_symlink_times(path, spec(a), spec(m)) };
                r.map(|()| FsReply::Unit).map_err(err)
            }
            (Some(_), Node::File(_)) => Err(FsError::NotDirectory),
            (None, node) => {
                let mut times = std::fs::FileTimes::new();
                if let Some(t) = std_time(a) {
                    times = times.set_accessed(t);
                }
                if let Some(t) = std_time(m) {
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
        for (i, entry) in dir.entries().map_err(err)?.enumerate().skip(skip) {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().into_string().map_err(|_| FsError::IllegalByteSequence)?;
            if entries.len() == FS_DIR_PAGE as usize || name.len() + 8 > budget {
                next = Some(i as u64);
                break;
            }
            budget -= name.len() + 8;
            let kind = entry.file_type().map(cap_file_type).unwrap_or(FileType::Unknown);
            entries.push((name, kind));
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
