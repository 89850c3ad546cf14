//! Guest RAM: one lazily-backed anonymous mapping from guest-physical 0, and the count of
//! its pages that are resident (touched by the VMM or the guest).

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};
use wasmvisor_abi::layout::{LARGE_PAGE_SIZE, MAX_MEMORY};

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not usable.
    #[error(
        "guest memory of {mib} MiB is not allowed: it must be a multiple of 2 MiB between 2 MiB and {max} MiB",
        max = MAX_MEMORY >> 20
    )]
    BadSize {
        /// The requested size in MiB.
        mib: u64,
    },
    /// The mapping failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// The requested size in MiB.
        mib: u64,
        /// The error from vm-memory.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Checks a RAM size given in MiB and returns it in bytes.
pub fn size_from_mib(mib: u64) -> Result<u64, MemoryError> {
    let bytes = mib.checked_mul(1 << 20).filter(|&b| b > 0 && b <= MAX_MEMORY && b % LARGE_PAGE_SIZE == 0);
    bytes.ok_or(MemoryError::BadSize { mib })
}

/// Maps `size` bytes of private, anonymous, unreserved memory at guest-physical 0. Nothing is
/// backed until it is touched.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::BadSize { mib: size >> 20 })?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|source| MemoryError::Map { mib: size >> 20, source })
}

/// Asks the host to back guest RAM from `gpa` (2 MiB aligned) to its end with transparent huge
/// pages (`MADV_HUGEPAGE`). The guest maps that RAM with 2 MiB pages, so a huge host page lets
/// the shadow MMU map a whole 2 MiB guest page on its first touch: one fault, where 4 KiB host
/// pages cost one fault per page (~10-30 us each under PVM, thousands of them for a large
/// component's instantiation). The price is memory in 2 MiB steps for RAM the guest touches.
/// Best effort: without THP, or with a mapping the kernel did not place on a 2 MiB boundary (so
/// guest and host pages cannot line up), pages stay small and nothing else changes. Returns
/// whether huge pages can apply.
pub fn use_huge_pages(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    let end = mem.last_addr().0 + 1;
    let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else { return false };
    if !gpa.is_multiple_of(LARGE_PAGE_SIZE) || !(host as u64).is_multiple_of(LARGE_PAGE_SIZE) {
        tracing::debug!(host = ?host, "guest RAM is not 2 MiB aligned on the host: no huge pages");
        return false;
    }
    let len = end.saturating_sub(gpa) as usize;
    // SAFETY: the range lies inside guest RAM's mapping (from `gpa` to its end); the advice
    // changes only how the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_HUGEPAGE failed");
    }
    rc == 0
}

/// Backs `[gpa, gpa + len)` of guest RAM with host pages now (MADV_POPULATE_WRITE), so that the
/// guest's first touch of them costs a shadow-page fault only (~2 us under PVM) instead of a
/// host page fault as well (~10 us). Best effort: on a kernel without the advice nothing changes.
pub fn prepopulate(mem: &GuestMemoryMmap, gpa: u64, len: u64) {
    let end = mem.last_addr().0 + 1;
    let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else { return };
    let len = len.min(end.saturating_sub(gpa)) as usize;
    // SAFETY: the range lies inside guest RAM's mapping (clamped above); populating only
    // allocates the zero pages that the mapping would allocate on first touch anyway.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE failed");
    }
}

/// A file mapped read-only and private into the VMM, to be shown to the guest as a read-only
/// memory slot (the component artifact). Pages come from the page cache, so VMs running the
/// same artifact share them; nothing the guest does can write to the file.
#[derive(Debug)]
pub struct FileMapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    mapped_len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing the pointer between threads is sound.
unsafe impl Send for FileMapping {}
// SAFETY: as above: nothing writes through it.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Maps `path` read-only. `max_len` bounds the file size.
    pub fn open(path: &std::path::Path, max_len: u64) -> std::io::Result<Self> {
        Self::from_file(path, std::fs::File::open(path)?, max_len)
    }

    /// As [`open`](Self::open), from a file already open (`path` names it in errors).
    pub fn from_file(path: &std::path::Path, file: std::fs::File, max_len: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        if len == 0 || len > max_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is {len} bytes; it must be 1 to {max_len} bytes", path.display()),
            ));
        }
        let len = len as usize;
        let mapped_len = len.next_multiple_of(4096);
        let ptr = map_aligned(&file, mapped_len)?;
        // Huge pages for the artifact as for guest RAM (see `use_huge_pages`): with the mapping
        // advised, reading the file in fills the page cache with 2 MiB folios, and the guest's
        // first read of each 2 MiB of code or data is one shadow fault instead of 512. An
        // 18 MB CPython component took 3,756 faults to run, 300 with this. Best effort: pages
        // already cached small stay small until the kernel drops them.
        // SAFETY: the range is the mapping just made; the advice changes only its backing.
        if unsafe { libc::madvise(ptr, mapped_len, libc::MADV_HUGEPAGE) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_HUGEPAGE on the artifact failed");
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, mapped_len })
    }

    /// The file's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file is empty (never: `open` refuses empty files).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped length (whole pages).
    pub fn mapped_len(&self) -> usize {
        self.mapped_len
    }

    /// Host address of the mapping.
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

/// Maps `len` bytes of `file` read-only and private at a 2 MiB-aligned address, so that 2 MiB
/// folios of the page cache can back 2 MiB guest pages: reserves `len + 2 MiB` of address
/// space, maps the file over its aligned part and gives the rest back.
fn map_aligned(file: &std::fs::File, len: usize) -> std::io::Result<*mut libc::c_void> {
    use std::os::fd::AsRawFd;
    let align = LARGE_PAGE_SIZE as usize;
    let reserve = len + align;
    // SAFETY: a fresh inaccessible anonymous reservation; the kernel picks the address.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), reserve, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = (base as usize).next_multiple_of(align);
    // SAFETY: [start, start + len) lies inside the reservation just made, which nothing else
    // uses; MAP_FIXED replaces that part of it with a private read-only mapping of the file.
    // The file may be shorter than `len` only within the last page.
    let ptr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    let mapped = ptr != libc::MAP_FAILED;
    let err = std::io::Error::last_os_error();
    let (head, tail) = (start - base as usize, base as usize + reserve - (start + len));
    // SAFETY: both ranges are the unused ends of the reservation (the file mapping is
    // [start, start + len)); on failure the whole reservation goes.
    unsafe {
        if !mapped {
            libc::munmap(base, reserve);
        } else {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
    }
    if mapped { Ok(ptr) } else { Err(err) }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; KVM's slot is gone by now (the VM is
        // dropped before the mapping).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped_len) };
    }
}

/// Which 4 KiB pages of `region` are resident in the host (`mincore`), one entry per page; all
/// of them if the kernel cannot say.
pub fn resident_map(region: &GuestRegionMmap) -> Vec<bool> {
    let page = 4096usize;
    let len = region.len() as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    let Ok(slice) = region.get_slice(vm_memory::MemoryRegionAddress(0), len) else {
        return vec![true; vec.len()];
    };
    // SAFETY: the pointer and length describe one live mapping owned by `region`, and `vec`
    // has one byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(slice.ptr_guard_mut().as_ptr().cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return vec![true; vec.len()];
    }
    vec.iter().map(|b| b & 1 != 0).collect()
}

/// Number of 4 KiB pages of guest RAM that are resident in the host.
pub fn resident_pages(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|region| resident_map(region).iter().filter(|r| **r).count() as u64).sum()
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_from_mib(64).unwrap(), 64 << 20);
        assert_eq!(size_from_mib(MAX_MEMORY >> 20).unwrap(), MAX_MEMORY);
        for bad in [0, 3, (MAX_MEMORY >> 20) + 2, u64::MAX] {
            let err = size_from_mib(bad).unwrap_err().to_string();
            assert!(err.contains("multiple of 2 MiB"), "{err}");
        }
    }

    #[test]
    fn memory_is_lazy_and_counted() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(resident_pages(&mem), 0);
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(resident_pages(&mem), 2);
    }
}
