//! `wasi:filesystem`: the tenant's preopened directories, served by the host's filesystem
//! provider over the capability connection (`Request::Fs*`).
//!
//! The guest owns the descriptor table (each `descriptor` resource holds the host's handle,
//! its type and its `descriptor-flags`), the directory-entry streams (a page of entries per
//! round trip) and the file streams: reads come ahead, placed by the host in the stream's
//! buffer, in chunks that grow to [`FS_PLACED_CHUNK`] (to [`FS_CHUNK`] where the broker is in
//! another process and answers the bytes, which the VMM then places), writes are gathered up to [`FS_CHUNK`] and sent when full, on `flush` of a
//! full buffer, before any other filesystem request, when the stream is dropped and when
//! the instance ends, so a stream of 4 KiB writes costs one round trip per ~1 MiB. An error
//! of a gathered write is reported by the stream's next operation.
//!
//! The host confines every path beneath its directory handle and refuses changes through a
//! read-only preopen; the guest checks the descriptor's flags first (as wasmtime does) so a
//! call that must fail costs no round trip. A tenant without preopens (the boot flag) sees
//! an empty list and makes no call at all.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use wasmtime::component::Resource;
use wasmvisor_abi::capability::{CapError, Reply, Request};
use wasmvisor_abi::fs::{FS_CHUNK, FS_PLACED_CHUNK, FileType, FsError, Handle, NewTime, Stat, Time, flags, open};

use super::wasi::clocks::wall_clock::Datetime;
use super::wasi::filesystem::{preopens, types};
use super::{Ctx, InputStream, IoError, OutputStream};

/// `descriptor`: an open file or directory on the host.
pub struct Descriptor {
    handle: Handle,
    kind: FileType,
    /// [`flags`] bits.
    flags: u8,
    /// A preopen: the host keeps it open whatever the guest drops.
    preopen: bool,
}

/// `directory-entry-stream`: entries fetched a page at a time.
pub struct DirEntries {
    handle: Handle,
    cursor: Option<u64>,
    page: VecDeque<(String, FileType)>,
}

/// The metadata hashes of the last page of entries read (directory handle, name → hash, when).
type PageHashes = (Handle, BTreeMap<String, (u64, u64)>, u64);

/// How long a page's hashes may answer `metadata-hash-at` of its entries.
const PAGE_REUSE_NS: u64 = 10_000_000;

/// A file's `input-stream`: its position and what was read ahead.
pub struct FileReader {
    handle: Handle,
    offset: u64,
    /// The read-ahead buffer (the host places reads in it); `ahead[pos..end]` is unread.
    ahead: Vec<u8>,
    pos: usize,
    end: usize,
    /// How much the next round trip asks for (doubles up to [`FS_PLACED_CHUNK`], or to
    /// [`FS_CHUNK`] once a read shows that the broker answers the bytes).
    next: u32,
    eof: bool,
    /// Opened without `read`: every read fails with `bad-descriptor`, as the OS's `EBADF`
    /// does under wasmtime (whose stream is made, and fails on use).
    refused: bool,
}

impl FileReader {
    /// A reader of nothing, in the table while the real one makes its round trip.
    pub(super) fn placeholder() -> Self {
        Self { handle: Handle::MAX, offset: 0, ahead: Vec::new(), pos: 0, end: 0, next: 0, eof: true, refused: false }
    }
}

/// A file's `output-stream`: where it writes and what it has gathered.
struct FileWriter {
    handle: Handle,
    /// `None`: at the end of the file (an append stream).
    offset: Option<u64>,
    buf: Vec<u8>,
    error: Option<FsError>,
    /// Opened without `write`: every write fails with `bad-descriptor` (see [`FileReader`]).
    refused: bool,
}

/// The instance's filesystem state.
#[derive(Default)]
pub struct FsState {
    /// The tenant has preopens (`BOOT_FLAG_PREOPENS`).
    present: bool,
    preopens: Option<Vec<(Handle, String, bool)>>,
    writers: BTreeMap<u32, FileWriter>,
    next_writer: u32,
    /// Handles this instance opened and has not closed (closed when it ends).
    opened: alloc::collections::BTreeSet<Handle>,
    /// The last stat fetched (by `open-at`, `stat` or `metadata-hash`), kept for the calls a C
    /// library makes right after (`fstat` is `metadata-hash` and `stat`): used within
    /// [`STAT_REUSE_NS`] and until any other call or write.
    last_stat: Option<CachedStat>,
    /// The hashes the last directory page brought, for the `metadata-hash-at` a C library
    /// asks of each entry (to fill `d_ino`); dropped by any other call.
    page_hashes: Option<PageHashes>,
    /// Handles dropped and not yet closed on the host: the next open closes them first.
    pending_close: Vec<Handle>,
}

/// Most dropped handles kept waiting for an open to carry them.
const PENDING_CLOSE_MAX: usize = 64;

/// A stat, what it was of (descriptor, and follow flag and path for an `-at`), and when.
type CachedStat = (Handle, Option<(bool, String)>, Stat, u64);

/// How long a fetched stat may answer its pair call.
const STAT_REUSE_NS: u64 = 1_000_000;

impl FsState {
    /// Nothing open yet; `present`: the tenant has preopens to ask for.
    pub fn new(present: bool) -> Self {
        Self { present, ..Self::default() }
    }
}

type FsResult<T> = wasmtime::Result<Result<T, types::ErrorCode>>;

/// The first read-ahead of a stream.
const FIRST_READ: u32 = 64 * 1024;

fn code(e: FsError) -> types::ErrorCode {
    use types::ErrorCode as C;
    match e {
        FsError::Access => C::Access,
        FsError::WouldBlock => C::WouldBlock,
        FsError::Already => C::Already,
        FsError::BadDescriptor => C::BadDescriptor,
        FsError::Busy => C::Busy,
        FsError::Deadlock => C::Deadlock,
        FsError::Quota => C::Quota,
        FsError::Exist => C::Exist,
        FsError::FileTooLarge => C::FileTooLarge,
        FsError::IllegalByteSequence => C::IllegalByteSequence,
        FsError::InProgress => C::InProgress,
        FsError::Interrupted => C::Interrupted,
        FsError::Invalid => C::Invalid,
        FsError::Io => C::Io,
        FsError::IsDirectory => C::IsDirectory,
        FsError::Loop => C::Loop,
        FsError::TooManyLinks => C::TooManyLinks,
        FsError::MessageSize => C::MessageSize,
        FsError::NameTooLong => C::NameTooLong,
        FsError::NoDevice => C::NoDevice,
        FsError::NoEntry => C::NoEntry,
        FsError::NoLock => C::NoLock,
        FsError::InsufficientMemory => C::InsufficientMemory,
        FsError::InsufficientSpace => C::InsufficientSpace,
        FsError::NotDirectory => C::NotDirectory,
        FsError::NotEmpty => C::NotEmpty,
        FsError::NotRecoverable => C::NotRecoverable,
        FsError::Unsupported => C::Unsupported,
        FsError::NoTty => C::NoTty,
        FsError::NoSuchDevice => C::NoSuchDevice,
        FsError::Overflow => C::Overflow,
        FsError::NotPermitted => C::NotPermitted,
        FsError::Pipe => C::Pipe,
        FsError::ReadOnly => C::ReadOnly,
        FsError::InvalidSeek => C::InvalidSeek,
        FsError::TextFileBusy => C::TextFileBusy,
        FsError::CrossDevice => C::CrossDevice,
    }
}

fn kind(k: FileType) -> types::DescriptorType {
    use types::DescriptorType as T;
    match k {
        FileType::Unknown => T::Unknown,
        FileType::BlockDevice => T::BlockDevice,
        FileType::CharacterDevice => T::CharacterDevice,
        FileType::Directory => T::Directory,
        FileType::Fifo => T::Fifo,
        FileType::SymbolicLink => T::SymbolicLink,
        FileType::RegularFile => T::RegularFile,
        FileType::Socket => T::Socket,
    }
}

fn datetime(t: Option<Time>) -> Option<Datetime> {
    t.map(|t| Datetime { seconds: t.seconds, nanoseconds: t.nanoseconds })
}

fn stat(s: Stat) -> types::DescriptorStat {
    types::DescriptorStat {
        type_: kind(s.kind),
        link_count: s.links,
        size: s.size,
        data_access_timestamp: datetime(s.accessed),
        data_modification_timestamp: datetime(s.modified),
        status_change_timestamp: datetime(s.changed),
    }
}

fn new_time(t: types::NewTimestamp) -> NewTime {
    match t {
        types::NewTimestamp::NoChange => NewTime::Unchanged,
        types::NewTimestamp::Now => NewTime::Now,
        types::NewTimestamp::Timestamp(d) => NewTime::At(Time { seconds: d.seconds, nanoseconds: d.nanoseconds }),
    }
}

fn flag_bits(f: types::DescriptorFlags) -> u8 {
    use types::DescriptorFlags as F;
    [
        (F::READ, flags::READ),
        (F::WRITE, flags::WRITE),
        (F::FILE_INTEGRITY_SYNC, flags::FILE_INTEGRITY_SYNC),
        (F::DATA_INTEGRITY_SYNC, flags::DATA_INTEGRITY_SYNC),
        (F::REQUESTED_WRITE_SYNC, flags::REQUESTED_WRITE_SYNC),
        (F::MUTATE_DIRECTORY, flags::MUTATE_DIRECTORY),
    ]
    .into_iter()
    .filter(|(f2, _)| f.contains(*f2))
    .fold(0, |acc, (_, b)| acc | b)
}

fn wit_flags(bits: u8) -> types::DescriptorFlags {
    use types::DescriptorFlags as F;
    let mut f = F::empty();
    for (b, f2) in [
        (flags::READ, F::READ),
        (flags::WRITE, F::WRITE),
        (flags::FILE_INTEGRITY_SYNC, F::FILE_INTEGRITY_SYNC),
        (flags::DATA_INTEGRITY_SYNC, F::DATA_INTEGRITY_SYNC),
        (flags::REQUESTED_WRITE_SYNC, F::REQUESTED_WRITE_SYNC),
        (flags::MUTATE_DIRECTORY, F::MUTATE_DIRECTORY),
    ] {
        if bits & b != 0 {
            f |= f2;
        }
    }
    f
}

fn follow(f: types::PathFlags) -> bool {
    f.contains(types::PathFlags::SYMLINK_FOLLOW)
}

/// A reply of the wrong kind: the host is broken; reported as an I/O error.
fn wrong<T>(_: Reply<'_>) -> Result<T, FsError> {
    Err(FsError::Io)
}

fn unit(r: Reply<'_>) -> Result<(), FsError> {
    match r {
        Reply::Unit => Ok(()),
        other => wrong(other),
    }
}

impl Ctx {
    /// One filesystem round trip: gathered writes go first, so the host sees them.
    fn fs<T>(&mut self, request: &Request<'_>, f: impl FnOnce(Reply<'_>) -> Result<T, FsError>) -> Result<T, FsError> {
        self.fs.last_stat = None;
        self.fs.page_hashes = None;
        self.flush_file_writers();
        self.fs_now(request, f)
    }

    fn fs_now<T>(
        &mut self,
        request: &Request<'_>,
        f: impl FnOnce(Reply<'_>) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        self.caps
            .call(request, |r| match r {
                Ok(reply) => f(reply),
                Err(CapError::Fs(e)) => Err(e),
                Err(CapError::NotGranted { .. }) => Err(FsError::NotPermitted),
                Err(_) => Err(FsError::Io),
            })
            .unwrap_or_else(|why| {
                log::warn!("wasi:filesystem call failed: {why}");
                Err(FsError::Io)
            })
    }

    /// Sends every stream's gathered writes; a failure stays with its stream.
    pub fn flush_file_writers(&mut self) {
        let ids: Vec<u32> = self.fs.writers.iter().filter(|(_, w)| !w.buf.is_empty()).map(|(id, _)| *id).collect();
        for id in ids {
            self.flush_writer(id);
        }
    }

    fn flush_writer(&mut self, id: u32) {
        let Some(w) = self.fs.writers.get_mut(&id) else { return };
        if w.buf.is_empty() {
            return;
        }
        let buf = core::mem::take(&mut w.buf);
        let (handle, mut offset) = (w.handle, w.offset);
        let mut failed = None;
        for chunk in buf.chunks(FS_CHUNK as usize) {
            let written = self.fs_now(&Request::FsWrite { handle, offset, data: chunk }, |r| match r {
                Reply::U64(n) => Ok(n),
                other => wrong(other),
            });
            match written {
                Ok(n) => offset = offset.map(|o| o + n),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let w = self.fs.writers.get_mut(&id).expect("present above");
        w.offset = offset;
        if failed.is_some() {
            w.error = failed;
        }
        // Keep the allocation for the next gathering.
        let mut buf = buf;
        buf.clear();
        w.buf = buf;
    }

    /// Closes what this instance opened (its end: an HTTP VM serves the next request with
    /// the same connection).
    pub fn close_files(&mut self) {
        self.flush_file_writers();
        let pending = core::mem::take(&mut self.fs.pending_close);
        for handle in pending.into_iter().chain(core::mem::take(&mut self.fs.opened)) {
            let _ = self.fs_now(&Request::FsClose { handle }, unit);
        }
    }

    /// A stat of `handle` (or of a path beneath it): the one the paired call just fetched, if
    /// it is that and fresh, else one round trip, kept for the pair.
    fn stat_once(&mut self, handle: Handle, at: Option<(bool, String)>) -> Result<Stat, FsError> {
        let now = self.clock.monotonic_ns();
        if let Some((h, a, s, t)) = &self.fs.last_stat
            && *h == handle
            && *a == at
            && now.saturating_sub(*t) < STAT_REUSE_NS
        {
            return Ok(*s);
        }
        let request = Request::FsStat { handle, at: at.as_ref().map(|(f, p)| (*f, p.as_str())) };
        let s = self.fs(&request, |r| match r {
            Reply::FsStat(s) => Ok(s),
            other => wrong(other),
        })?;
        self.fs.last_stat = Some((handle, at, s, self.clock.monotonic_ns()));
        Ok(s)
    }

    fn desc(&self, d: &Resource<Descriptor>) -> wasmtime::Result<(Handle, FileType, u8)> {
        let d = self.table.get(d)?;
        Ok((d.handle, d.kind, d.flags))
    }

    /// A directory descriptor's handle, or the error a non-directory gives.
    fn dir(&self, d: &Resource<Descriptor>) -> wasmtime::Result<Result<(Handle, u8), FsError>> {
        let (handle, k, f) = self.desc(d)?;
        Ok(if k == FileType::Directory { Ok((handle, f)) } else { Err(FsError::NotDirectory) })
    }

    /// A directory that may be changed.
    fn dir_mut(&self, d: &Resource<Descriptor>) -> wasmtime::Result<Result<Handle, FsError>> {
        Ok(self
            .dir(d)?
            .and_then(|(h, f)| if f & flags::MUTATE_DIRECTORY != 0 { Ok(h) } else { Err(FsError::NotPermitted) }))
    }

    /// Reads from a file stream.
    pub(super) fn read_file_stream(&mut self, r: &mut FileReader, len: u64) -> Result<Vec<u8>, FsError> {
        if r.refused {
            return Err(FsError::BadDescriptor);
        }
        if r.pos >= r.end {
            if r.eof {
                return Ok(Vec::new());
            }
            let want = r.next.max(len.min(u64::from(FS_CHUNK)) as u32);
            let n = self.read_into(r.handle, r.offset, &mut r.ahead, want)?;
            // A broker that places reads itself fills up to FS_PLACED_CHUNK, one that answers
            // the bytes up to FS_CHUNK: less than the most either could give means the end.
            let answered = n == FS_CHUNK as usize && want > FS_CHUNK;
            r.eof = if n > FS_CHUNK as usize { n < want as usize } else { n < want.min(FS_CHUNK) as usize };
            r.offset += n as u64;
            r.pos = 0;
            r.end = n;
            r.next = if answered {
                // Chunks beyond a frame's would only hold memory here.
                r.ahead.truncate(FS_CHUNK as usize);
                r.ahead.shrink_to_fit();
                FS_CHUNK
            } else {
                want.saturating_mul(2).min(FS_PLACED_CHUNK)
            };
        }
        let end = r.end.min(r.pos + len.min(u64::from(FS_CHUNK)) as usize);
        let out = r.ahead[r.pos..end].to_vec();
        r.pos = end;
        Ok(out)
    }

    /// Reads up to `want` bytes at `offset` into `buf` (grown to `want` if shorter), placed
    /// there by the VMM (`FsRead { into }`): the bytes skip the vsock queues. Returns how many.
    fn read_into(&mut self, handle: Handle, offset: u64, buf: &mut Vec<u8>, want: u32) -> Result<usize, FsError> {
        if buf.len() < want as usize {
            buf.resize(want as usize, 0);
        }
        // The host writes into `buf` while this call waits for its answer; the buffer is
        // guest RAM owned here, and nothing reads it before the answer says how much came.
        let into = Some(buf.as_mut_ptr() as u64);
        let placed = self.fs(&Request::FsRead { handle, offset, len: want, into }, |reply| match reply {
            Reply::U64(n) if n <= u64::from(want) => Ok((n as usize, None)),
            Reply::Bytes(b) => Ok((b.map_or(0, <[u8]>::len), b.map(<[u8]>::to_vec))),
            other => wrong(other),
        })?;
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        Ok(match placed {
            (n, None) => n,
            // A VMM that does not place reads answers with the bytes.
            (n, Some(bytes)) if n <= buf.len() => {
                buf[..n].copy_from_slice(&bytes);
                n
            }
            _ => return Err(FsError::Io),
        })
    }

    /// Gathers `bytes` for file stream `id`, sending when the buffer is full.
    pub(super) fn write_file_stream(&mut self, id: u32, bytes: &[u8]) -> Result<(), FsError> {
        // A gathered write changes what a stat would say.
        self.fs.last_stat = None;
        self.fs.page_hashes = None;
        let w = self.fs.writers.get_mut(&id).ok_or(FsError::BadDescriptor)?;
        if w.refused {
            return Err(FsError::BadDescriptor);
        }
        if let Some(e) = w.error.take() {
            return Err(e);
        }
        w.buf.extend_from_slice(bytes);
        // An explicit flush leaves the buffer gathered: every other request, the stream's
        // drop, a block on a pollable and the instance's end send it first.
        if w.buf.len() >= FS_CHUNK as usize {
            self.flush_writer(id);
            if let Some(e) = self.fs.writers.get_mut(&id).and_then(|w| w.error.take()) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// A file stream was dropped: what it gathered goes out now.
    pub(super) fn drop_file_stream(&mut self, id: u32) {
        self.flush_writer(id);
        self.fs.writers.remove(&id);
    }

    fn new_writer(
        &mut self,
        handle: Handle,
        offset: Option<u64>,
        refused: bool,
    ) -> wasmtime::Result<Resource<OutputStream>> {
        let id = self.fs.next_writer;
        self.fs.next_writer = self.fs.next_writer.wrapping_add(1);
        self.fs.writers.insert(id, FileWriter { handle, offset, buf: Vec::new(), error: None, refused });
        Ok(self.table.push(OutputStream::File(id))?)
    }
}

/// The [`IoError`] a file stream fails with, carrying its code for `filesystem-error-code`.
pub(super) fn io_error(e: FsError) -> IoError {
    IoError(alloc::format!("filesystem error: {e:?}"), Some(e))
}

impl preopens::Host for Ctx {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        if !self.fs.present {
            return Ok(Vec::new());
        }
        if self.fs.preopens.is_none() {
            let list = self.fs(&Request::FsPreopens, |r| match r {
                Reply::FsPreopens(list) => Ok(list.into_iter().map(|(h, n, ro)| (h, n.to_string(), ro)).collect()),
                other => wrong(other),
            });
            match list {
                Ok(list) => self.fs.preopens = Some(list),
                Err(e) => {
                    log::warn!("wasi:filesystem: the preopened directories are unavailable: {e:?}");
                    return Ok(Vec::new());
                }
            }
        }
        let list = self.fs.preopens.clone().unwrap_or_default();
        let mut out = Vec::with_capacity(list.len());
        for (handle, name, readonly) in list {
            let flags = if readonly { flags::READ } else { flags::READ | flags::MUTATE_DIRECTORY };
            let d = self.table.push(Descriptor { handle, kind: FileType::Directory, flags, preopen: true })?;
            out.push((d, name));
        }
        Ok(out)
    }
}

impl types::Host for Ctx {
    fn filesystem_error_code(&mut self, err: Resource<IoError>) -> wasmtime::Result<Option<types::ErrorCode>> {
        Ok(self.table.get(&err)?.1.map(code))
    }
}

type D = Resource<Descriptor>;

/// `Ok(Err(code))` from an `FsError` result.
fn done<T>(r: Result<T, FsError>) -> FsResult<T> {
    Ok(r.map_err(code))
}

macro_rules! try_fs {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(code(e))),
        }
    };
}

impl types::HostDescriptor for Ctx {
    fn read_via_stream(&mut self, d: D, offset: u64) -> FsResult<Resource<InputStream>> {
        let (handle, k, f) = self.desc(&d)?;
        if k == FileType::Directory {
            return done(Err(FsError::IsDirectory));
        }
        let refused = f & flags::READ == 0;
        let r = FileReader { handle, offset, ahead: Vec::new(), pos: 0, end: 0, next: FIRST_READ, eof: false, refused };
        Ok(Ok(self.table.push(InputStream::File(r))?))
    }

    fn write_via_stream(&mut self, d: D, offset: u64) -> FsResult<Resource<OutputStream>> {
        let (handle, k, f) = self.desc(&d)?;
        if k == FileType::Directory {
            return done(Err(FsError::BadDescriptor));
        }
        Ok(Ok(self.new_writer(handle, Some(offset), f & flags::WRITE == 0)?))
    }

    fn append_via_stream(&mut self, d: D) -> FsResult<Resource<OutputStream>> {
        let (handle, k, f) = self.desc(&d)?;
        if k == FileType::Directory {
            return done(Err(FsError::BadDescriptor));
        }
        Ok(Ok(self.new_writer(handle, None, f & flags::WRITE == 0)?))
    }

    fn advise(&mut self, d: D, _offset: u64, _len: u64, _advice: types::Advice) -> FsResult<()> {
        // Advice is a hint; the host's page cache does its own read-ahead.
        let (_, k, _) = self.desc(&d)?;
        done(if k == FileType::Directory { Err(FsError::BadDescriptor) } else { Ok(()) })
    }

    fn sync_data(&mut self, d: D) -> FsResult<()> {
        let (handle, _, _) = self.desc(&d)?;
        done(self.fs(&Request::FsSync { handle, data_only: true }, unit))
    }

    fn sync(&mut self, d: D) -> FsResult<()> {
        let (handle, _, _) = self.desc(&d)?;
        done(self.fs(&Request::FsSync { handle, data_only: false }, unit))
    }

    fn get_flags(&mut self, d: D) -> FsResult<types::DescriptorFlags> {
        Ok(Ok(wit_flags(self.desc(&d)?.2)))
    }

    fn get_type(&mut self, d: D) -> FsResult<types::DescriptorType> {
        Ok(Ok(kind(self.desc(&d)?.1)))
    }

    fn set_size(&mut self, d: D, size: u64) -> FsResult<()> {
        let (handle, k, _) = self.desc(&d)?;
        // As wasmtime: a directory is not a file; a file not open for writing is the OS's to
        // refuse.
        if k == FileType::Directory {
            return done(Err(FsError::BadDescriptor));
        }
        done(self.fs(&Request::FsSetSize { handle, size }, unit))
    }

    fn set_times(&mut self, d: D, atime: types::NewTimestamp, mtime: types::NewTimestamp) -> FsResult<()> {
        let (handle, _, _) = self.desc(&d)?;
        let req = Request::FsSetTimes { handle, at: None, accessed: new_time(atime), modified: new_time(mtime) };
        done(self.fs(&req, unit))
    }

    fn read(&mut self, d: D, len: u64, offset: u64) -> FsResult<(Vec<u8>, bool)> {
        let (handle, k, f) = self.desc(&d)?;
        if k == FileType::Directory {
            return done(Err(FsError::BadDescriptor));
        }
        if f & flags::READ == 0 {
            return done(Err(FsError::BadDescriptor));
        }
        let want = len.min(u64::from(FS_CHUNK)) as u32;
        let mut bytes = Vec::new();
        let n = try_fs!(self.read_into(handle, offset, &mut bytes, want));
        bytes.truncate(n);
        let eof = (bytes.len() as u64) < u64::from(want) || (want == 0 && len > 0);
        Ok(Ok((bytes, eof)))
    }

    fn write(&mut self, d: D, buf: Vec<u8>, offset: u64) -> FsResult<u64> {
        let (handle, k, f) = self.desc(&d)?;
        if k == FileType::Directory {
            return done(Err(FsError::BadDescriptor));
        }
        if f & flags::WRITE == 0 {
            return done(Err(FsError::BadDescriptor));
        }
        let mut written = 0u64;
        for chunk in buf.chunks(FS_CHUNK as usize) {
            let req = Request::FsWrite { handle, offset: Some(offset + written), data: chunk };
            written += try_fs!(self.fs(&req, |r| match r {
                Reply::U64(n) => Ok(n),
                other => wrong(other),
            }));
        }
        Ok(Ok(written))
    }

    fn read_directory(&mut self, d: D) -> FsResult<Resource<DirEntries>> {
        let (handle, _) = try_fs!(self.dir(&d)?);
        Ok(Ok(self.table.push(DirEntries { handle, cursor: Some(0), page: VecDeque::new() })?))
    }

    fn create_directory_at(&mut self, d: D, path: String) -> FsResult<()> {
        let dir = try_fs!(self.dir_mut(&d)?);
        done(self.fs(&Request::FsCreateDir { dir, path: &path }, unit))
    }

    fn stat(&mut self, d: D) -> FsResult<types::DescriptorStat> {
        let (handle, _, _) = self.desc(&d)?;
        done(self.stat_once(handle, None).map(stat))
    }

    fn stat_at(&mut self, d: D, pf: types::PathFlags, path: String) -> FsResult<types::DescriptorStat> {
        let (handle, _) = try_fs!(self.dir(&d)?);
        done(self.stat_once(handle, Some((follow(pf), path))).map(stat))
    }

    fn set_times_at(
        &mut self,
        d: D,
        pf: types::PathFlags,
        path: String,
        atime: types::NewTimestamp,
        mtime: types::NewTimestamp,
    ) -> FsResult<()> {
        let handle = try_fs!(self.dir_mut(&d)?);
        let req = Request::FsSetTimes {
            handle,
            at: Some((follow(pf), &path)),
            accessed: new_time(atime),
            modified: new_time(mtime),
        };
        done(self.fs(&req, unit))
    }

    fn link_at(&mut self, d: D, pf: types::PathFlags, old: String, new_d: D, new: String) -> FsResult<()> {
        let dir = try_fs!(self.dir_mut(&d)?);
        let new_dir = try_fs!(self.dir_mut(&new_d)?);
        done(self.fs(&Request::FsLink { dir, follow: follow(pf), old: &old, new_dir, new: &new }, unit))
    }

    fn open_at(
        &mut self,
        d: D,
        pf: types::PathFlags,
        path: String,
        of: types::OpenFlags,
        df: types::DescriptorFlags,
    ) -> FsResult<D> {
        let (dir, parent) = try_fs!(self.dir(&d)?);
        let mut o = 0;
        for (f, b) in [
            (types::OpenFlags::CREATE, open::CREATE),
            (types::OpenFlags::DIRECTORY, open::DIRECTORY),
            (types::OpenFlags::EXCLUSIVE, open::EXCLUSIVE),
            (types::OpenFlags::TRUNCATE, open::TRUNCATE),
        ] {
            if of.contains(f) {
                o |= b;
            }
        }
        let bits = flag_bits(df);
        // A directory opened without the right to change it hands that right to nothing.
        if parent & flags::MUTATE_DIRECTORY == 0
            && (o & (open::CREATE | open::TRUNCATE) != 0 || bits & (flags::WRITE | flags::MUTATE_DIRECTORY) != 0)
        {
            return done(Err(FsError::NotPermitted));
        }
        let close = core::mem::take(&mut self.fs.pending_close);
        let req = Request::FsOpenAt { dir, follow: follow(pf), path: &path, open: o, flags: bits, close };
        let (handle, k, st) = try_fs!(self.fs(&req, |r| match r {
            Reply::FsOpened { handle, kind, stat } => Ok((handle, kind, stat)),
            other => wrong(other),
        }));
        self.fs.opened.insert(handle);
        self.fs.last_stat = Some((handle, None, st, self.clock.monotonic_ns()));
        // A directory has its parent's rights whatever was asked (as under wasmtime, and
        // the preview 1 adapter asks for none); a file has what was asked.
        let flags = if k == FileType::Directory { parent } else { bits };
        Ok(Ok(self.table.push(Descriptor { handle, kind: k, flags, preopen: false })?))
    }

    fn readlink_at(&mut self, d: D, path: String) -> FsResult<String> {
        let (dir, _) = try_fs!(self.dir(&d)?);
        done(self.fs(&Request::FsReadLink { dir, path: &path }, |r| match r {
            Reply::Text(Some(t)) => Ok(t.to_string()),
            other => wrong(other),
        }))
    }

    fn remove_directory_at(&mut self, d: D, path: String) -> FsResult<()> {
        let dir = try_fs!(self.dir_mut(&d)?);
        done(self.fs(&Request::FsRemoveDir { dir, path: &path }, unit))
    }

    fn rename_at(&mut self, d: D, old: String, new_d: D, new: String) -> FsResult<()> {
        let dir = try_fs!(self.dir_mut(&d)?);
        let new_dir = try_fs!(self.dir_mut(&new_d)?);
        done(self.fs(&Request::FsRename { dir, old: &old, new_dir, new: &new }, unit))
    }

    fn symlink_at(&mut self, d: D, old: String, new: String) -> FsResult<()> {
        let dir = try_fs!(self.dir_mut(&d)?);
        done(self.fs(&Request::FsSymlink { dir, target: &old, path: &new }, unit))
    }

    fn unlink_file_at(&mut self, d: D, path: String) -> FsResult<()> {
        let dir = try_fs!(self.dir_mut(&d)?);
        done(self.fs(&Request::FsUnlink { dir, path: &path }, unit))
    }

    fn is_same_object(&mut self, d: D, other: D) -> wasmtime::Result<bool> {
        let (a, _, _) = self.desc(&d)?;
        let (b, _, _) = self.desc(&other)?;
        if a == b {
            return Ok(true);
        }
        Ok(self
            .fs(&Request::FsSameObject { a, b }, |r| match r {
                Reply::Bool(same) => Ok(same),
                other => wrong(other),
            })
            .unwrap_or(false))
    }

    fn metadata_hash(&mut self, d: D) -> FsResult<types::MetadataHashValue> {
        let (handle, _, _) = self.desc(&d)?;
        done(self.stat_once(handle, None).map(|s| types::MetadataHashValue { lower: s.hash.0, upper: s.hash.1 }))
    }

    fn metadata_hash_at(&mut self, d: D, pf: types::PathFlags, path: String) -> FsResult<types::MetadataHashValue> {
        let (handle, _) = try_fs!(self.dir(&d)?);
        if !follow(pf)
            && let Some((h, hashes, at)) = &self.fs.page_hashes
            && *h == handle
            && self.clock.monotonic_ns().saturating_sub(*at) < PAGE_REUSE_NS
            && let Some((lower, upper)) = hashes.get(&path)
        {
            return Ok(Ok(types::MetadataHashValue { lower: *lower, upper: *upper }));
        }
        let s = self.stat_once(handle, Some((follow(pf), path)));
        done(s.map(|s| types::MetadataHashValue { lower: s.hash.0, upper: s.hash.1 }))
    }

    fn drop(&mut self, d: D) -> wasmtime::Result<()> {
        let d = self.table.delete(d)?;
        if !d.preopen && self.fs.opened.remove(&d.handle) {
            // Closed by the next open (streams of this file send their gathered writes before
            // any request), or here once enough wait.
            self.fs.pending_close.push(d.handle);
            if self.fs.pending_close.len() >= PENDING_CLOSE_MAX {
                for handle in core::mem::take(&mut self.fs.pending_close) {
                    let _ = self.fs(&Request::FsClose { handle }, unit);
                }
            }
        }
        Ok(())
    }
}

impl types::HostDirectoryEntryStream for Ctx {
    fn read_directory_entry(&mut self, s: Resource<DirEntries>) -> FsResult<Option<types::DirectoryEntry>> {
        let (handle, cursor, empty) = {
            let e = self.table.get(&s)?;
            (e.handle, e.cursor, e.page.is_empty())
        };
        if empty {
            let Some(cursor) = cursor else { return Ok(Ok(None)) };
            let (entries, hashes, next) = try_fs!(self.fs(&Request::FsReadDir { handle, cursor }, |r| match r {
                Reply::FsEntries { entries, next } => Ok((
                    entries.iter().map(|(n, k, _)| (n.to_string(), *k)).collect::<VecDeque<_>>(),
                    entries.iter().map(|(n, _, h)| (n.to_string(), *h)).collect::<BTreeMap<_, _>>(),
                    next,
                )),
                other => wrong(other),
            }));
            self.fs.page_hashes = Some((handle, hashes, self.clock.monotonic_ns()));
            let e = self.table.get_mut(&s)?;
            e.page = entries;
            e.cursor = next;
        }
        let e = self.table.get_mut(&s)?;
        Ok(Ok(e.page.pop_front().map(|(name, k)| types::DirectoryEntry { type_: kind(k), name })))
    }

    fn drop(&mut self, s: Resource<DirEntries>) -> wasmtime::Result<()> {
        self.table.delete(s)?;
        Ok(())
    }
}
