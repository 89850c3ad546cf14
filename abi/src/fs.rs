//! The `wasi:filesystem` part of the capability protocol: the types a guest's filesystem calls
//! and the host's answers carry (the requests themselves are [`crate::capability::Request`]'s
//! `Fs*` variants).
//!
//! The guest keeps its descriptor table (resources, flags, streams); the host keeps the open
//! files and directories behind [`Handle`]s, numbered per connection, starting from the
//! preopens it lists. Every enum here mirrors its WIT type in declaration order, so that each
//! side converts by index; [`FsError`] is `wasi:filesystem`'s `error-code`.

use serde::{Deserialize, Serialize};

/// A host-side open file or directory, valid on the connection that opened it.
pub type Handle = u32;

/// `descriptor-type`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    /// `unknown`
    Unknown,
    /// `block-device`
    BlockDevice,
    /// `character-device`
    CharacterDevice,
    /// `directory`
    Directory,
    /// `fifo`
    Fifo,
    /// `symbolic-link`
    SymbolicLink,
    /// `regular-file`
    RegularFile,
    /// `socket`
    Socket,
}

/// Declares [`FsError`] and its list in one place (the WIT order is the declaration order).
macro_rules! fs_errors {
    ($($name:ident),* $(,)?) => {
        /// `error-code`, in WIT order.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[allow(missing_docs)]
        pub enum FsError {
            $($name),*
        }

        impl FsError {
            /// Every error code, in WIT order.
            pub const ALL: &'static [FsError] = &[$(FsError::$name),*];
        }
    };
}

fs_errors! {
    Access,
    WouldBlock,
    Already,
    BadDescriptor,
    Busy,
    Deadlock,
    Quota,
    Exist,
    FileTooLarge,
    IllegalByteSequence,
    InProgress,
    Interrupted,
    Invalid,
    Io,
    IsDirectory,
    Loop,
    TooManyLinks,
    MessageSize,
    NameTooLong,
    NoDevice,
    NoEntry,
    NoLock,
    InsufficientMemory,
    InsufficientSpace,
    NotDirectory,
    NotEmpty,
    NotRecoverable,
    Unsupported,
    NoTty,
    NoSuchDevice,
    Overflow,
    NotPermitted,
    Pipe,
    ReadOnly,
    InvalidSeek,
    TextFileBusy,
    CrossDevice,
}

/// A point in time: seconds and nanoseconds since the Unix epoch (`datetime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    /// Seconds.
    pub seconds: u64,
    /// Nanoseconds, below one second.
    pub nanoseconds: u32,
}

/// `descriptor-stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    /// Its type.
    pub kind: FileType,
    /// Hard links to it.
    pub links: u64,
    /// Its size in bytes (a symbolic link: its target's length).
    pub size: u64,
    /// Last access.
    pub accessed: Option<Time>,
    /// Last modification.
    pub modified: Option<Time>,
    /// Last status change.
    pub changed: Option<Time>,
    /// Its `metadata-hash` (`lower`, `upper`), sent along so that the `metadata-hash` a C
    /// library asks for right after a stat costs no second round trip.
    pub hash: (u64, u64),
}

/// `new-timestamp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewTime {
    /// `no-change`
    Unchanged,
    /// `now`
    Now,
    /// `timestamp`
    At(Time),
}

/// `open-flags`, as bits.
pub mod open {
    /// `create`
    pub const CREATE: u8 = 1;
    /// `directory`
    pub const DIRECTORY: u8 = 2;
    /// `exclusive`
    pub const EXCLUSIVE: u8 = 4;
    /// `truncate`
    pub const TRUNCATE: u8 = 8;
}

/// `descriptor-flags`, as bits (the sync requests are accepted and have no effect beyond
/// `sync`, as wasmtime's).
pub mod flags {
    /// `read`
    pub const READ: u8 = 1;
    /// `write`
    pub const WRITE: u8 = 2;
    /// `file-integrity-sync`
    pub const FILE_INTEGRITY_SYNC: u8 = 4;
    /// `data-integrity-sync`
    pub const DATA_INTEGRITY_SYNC: u8 = 8;
    /// `requested-write-sync`
    pub const REQUESTED_WRITE_SYNC: u8 = 16;
    /// `mutate-directory`
    pub const MUTATE_DIRECTORY: u8 = 32;
}

/// The most bytes one `FsRead` returns or one `FsWrite` carries: a frame holds them with room
/// to spare.
pub const FS_CHUNK: u32 = 960 * 1024;

/// The most bytes one `FsRead { into }` places in the guest's buffer where the broker itself
/// places them (its process maps guest RAM: `wasmvisor run`); the bytes cross no frame. Where
/// they are answered instead, a read returns at most [`FS_CHUNK`], so only a count below that
/// tells the reader that the file ended.
pub const FS_PLACED_CHUNK: u32 = 4 << 20;

/// The most entries one `FsReadDir` page returns.
pub const FS_DIR_PAGE: u32 = 1024;

impl FsError {
    /// The error with WIT index `i`.
    pub fn from_index(i: u8) -> Option<Self> {
        Self::ALL.get(usize::from(i)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_indices_are_the_wit_order() {
        for i in 0..37u8 {
            assert_eq!(FsError::from_index(i).map(|e| e as u8), Some(i));
        }
        assert_eq!(FsError::from_index(37), None);
        assert_eq!(FsError::CrossDevice as u8, 36);
        assert_eq!(FsError::ReadOnly as u8, 33);
    }
}
