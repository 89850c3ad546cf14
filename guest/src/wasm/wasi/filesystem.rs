//! `wasi:filesystem`: present, with no preopened directories. Without a preopen a component
//! can never hold a descriptor, so every path-based operation fails before it starts (the
//! component's libc reports "no such file or directory" / "not capable"); the descriptor
//! methods are unreachable.

use alloc::string::String;
use alloc::vec::Vec;

use wasmtime::component::Resource;

use super::wasi::filesystem::{preopens, types};
use super::{Ctx, InputStream, IoError, Never, OutputStream, unreachable_resource};

impl preopens::Host for Ctx {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Never>, String)>> {
        Ok(Vec::new())
    }
}

impl types::Host for Ctx {
    fn filesystem_error_code(&mut self, _err: Resource<IoError>) -> wasmtime::Result<Option<types::ErrorCode>> {
        Ok(None)
    }
}

type FsResult<T> = wasmtime::Result<Result<T, types::ErrorCode>>;
type Descriptor = Resource<Never>;

/// The descriptor methods: unreachable, since no descriptor is ever handed out.
impl types::HostDescriptor for Ctx {
    fn read_via_stream(&mut self, _d: Descriptor, _offset: u64) -> FsResult<Resource<InputStream>> {
        Err(unreachable_resource())
    }
    fn write_via_stream(&mut self, _d: Descriptor, _offset: u64) -> FsResult<Resource<OutputStream>> {
        Err(unreachable_resource())
    }
    fn append_via_stream(&mut self, _d: Descriptor) -> FsResult<Resource<OutputStream>> {
        Err(unreachable_resource())
    }
    fn advise(&mut self, _d: Descriptor, _offset: u64, _len: u64, _advice: types::Advice) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn sync_data(&mut self, _d: Descriptor) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn get_flags(&mut self, _d: Descriptor) -> FsResult<types::DescriptorFlags> {
        Err(unreachable_resource())
    }
    fn get_type(&mut self, _d: Descriptor) -> FsResult<types::DescriptorType> {
        Err(unreachable_resource())
    }
    fn set_size(&mut self, _d: Descriptor, _size: u64) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn set_times(&mut self, _d: Descriptor, _atime: types::NewTimestamp, _mtime: types::NewTimestamp) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn read(&mut self, _d: Descriptor, _len: u64, _offset: u64) -> FsResult<(Vec<u8>, bool)> {
        Err(unreachable_resource())
    }
    fn write(&mut self, _d: Descriptor, _buf: Vec<u8>, _offset: u64) -> FsResult<u64> {
        Err(unreachable_resource())
    }
    fn read_directory(&mut self, _d: Descriptor) -> FsResult<Resource<Never>> {
        Err(unreachable_resource())
    }
    fn sync(&mut self, _d: Descriptor) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn create_directory_at(&mut self, _d: Descriptor, _path: String) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn stat(&mut self, _d: Descriptor) -> FsResult<types::DescriptorStat> {
        Err(unreachable_resource())
    }
    fn stat_at(&mut self, _d: Descriptor, _flags: types::PathFlags, _path: String) -> FsResult<types::DescriptorStat> {
        Err(unreachable_resource())
    }
    fn set_times_at(
        &mut self,
        _d: Descriptor,
        _flags: types::PathFlags,
        _path: String,
        _atime: types::NewTimestamp,
        _mtime: types::NewTimestamp,
    ) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn link_at(
        &mut self,
        _d: Descriptor,
        _old_flags: types::PathFlags,
        _old_path: String,
        _new: Descriptor,
        _new_path: String,
    ) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn open_at(
        &mut self,
        _d: Descriptor,
        _path_flags: types::PathFlags,
        _path: String,
        _open_flags: types::OpenFlags,
        _flags: types::DescriptorFlags,
    ) -> FsResult<Descriptor> {
        Err(unreachable_resource())
    }
    fn readlink_at(&mut self, _d: Descriptor, _path: String) -> FsResult<String> {
        Err(unreachable_resource())
    }
    fn remove_directory_at(&mut self, _d: Descriptor, _path: String) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn rename_at(&mut self, _d: Descriptor, _old: String, _new: Descriptor, _new_path: String) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn symlink_at(&mut self, _d: Descriptor, _old: String, _new: String) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn unlink_file_at(&mut self, _d: Descriptor, _path: String) -> FsResult<()> {
        Err(unreachable_resource())
    }
    fn is_same_object(&mut self, _d: Descriptor, _other: Descriptor) -> wasmtime::Result<bool> {
        Err(unreachable_resource())
    }
    fn metadata_hash(&mut self, _d: Descriptor) -> FsResult<types::MetadataHashValue> {
        Err(unreachable_resource())
    }
    fn metadata_hash_at(
        &mut self,
        _d: Descriptor,
        _flags: types::PathFlags,
        _path: String,
    ) -> FsResult<types::MetadataHashValue> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _d: Descriptor) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}

impl types::HostDirectoryEntryStream for Ctx {
    fn read_directory_entry(&mut self, _s: Resource<Never>) -> FsResult<Option<types::DirectoryEntry>> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _s: Resource<Never>) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}
