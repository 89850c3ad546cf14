//! The guest image: reading, validating and loading a fixed-address x86-64 ELF executable.
//!
//! Everything about the file is checked before a VM exists: that it is a little-endian
//! 64-bit x86-64 `ET_EXEC`, that every `PT_LOAD` segment is well-formed, lies above
//! `IMAGE_BASE` and (with its `.bss`) fits the configured RAM with room for a heap. Loading
//! is then a copy of each segment's file bytes; the rest of the segment is already zero in
//! fresh anonymous memory. The symbol table is kept to name the function at a faulting RIP.
//!
//! We parse with the `object` crate rather than linux-loader's ELF loader: that one is made
//! for Linux kernels (it requires 2 MiB-aligned segments, checks neither class nor machine,
//! and leaves `.bss`-only segments out of the image end).

use std::path::{Path, PathBuf};

use object::elf::{EM_X86_64, ET_DYN, ET_EXEC, FileHeader64, PF_X, PT_LOAD, SHT_SYMTAB, STT_FUNC};
use object::read::elf::{FileHeader, ProgramHeader, Sym};
use object::{Endianness, LittleEndian};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use wasmvisor_abi::layout::{IMAGE_BASE, MAX_MEMORY, MIN_FREE_MEMORY, PAGE_SIZE};

/// What is wrong with a guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read guest image {path}: {source}")]
    Read {
        /// The image path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a 64-bit little-endian x86-64 ELF executable.
    #[error("guest image {path} is not an x86-64 ELF executable: {why}")]
    NotX86_64Elf {
        /// The image path.
        path: PathBuf,
        /// What was found instead.
        why: String,
    },
    /// The ELF structure is malformed or unsupported.
    #[error("guest image {path} is malformed: {why}")]
    Malformed {
        /// The image path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The image does not fit the VM's RAM.
    #[error(
        "guest image {path} does not fit in {memory_mib} MiB of guest memory: it needs at least \
         {need_mib} MiB (image up to {end:#x} plus {min_free_kib} KiB of heap); raise --memory"
    )]
    TooLarge {
        /// The image path.
        path: PathBuf,
        /// Highest address of the image.
        end: u64,
        /// The configured RAM.
        memory_mib: u64,
        /// The least RAM that would do.
        need_mib: u64,
        /// Heap the guest needs at the least.
        min_free_kib: u64,
    },
    /// Copying into guest memory failed.
    #[error("cannot load guest image {path} into guest memory: {source}")]
    Load {
        /// The image path.
        path: PathBuf,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: u64,
    mem_end: u64,
    offset: usize,
    file_size: usize,
}

/// Where the image's bytes come from.
#[derive(Debug)]
enum Source {
    /// An open file: segments are mapped from it, privately, page by page.
    File(std::fs::File),
    /// Bytes in memory (tests): segments are copied.
    Bytes(Vec<u8>),
}

/// A guest image file's identity for snapshots (see [`GuestImage::identity`]).
pub fn file_identity(file: &std::fs::File) -> String {
    use std::os::unix::fs::MetadataExt;
    match file.metadata() {
        Ok(m) => format!("file:{}:{}:{}:{}.{}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()),
        Err(_) => String::from("file:unknown"),
    }
}

/// A validated guest image, ready to be loaded into any VM with enough RAM.
#[derive(Debug)]
pub struct GuestImage {
    path: PathBuf,
    source: Source,
    entry: u64,
    end: u64,
    segments: Vec<Segment>,
}

/// How much of the file `open` reads to find the ELF and program headers.
const HEAD_READ: u64 = 64 * 1024;

impl GuestImage {
    /// What identifies the image's contents for a snapshot made of a guest booted from it: the
    /// file's device, inode, size and modification time (a rebuilt image is a new file), or
    /// the digest of bytes held in memory.
    pub fn identity(&self) -> String {
        match &self.source {
            Source::File(f) => file_identity(f),
            Source::Bytes(b) => format!("blake3:{}", blake3::hash(b).to_hex()),
        }
    }

    /// Opens and validates the ELF file at `path`. Only the headers are read; `load` maps the
    /// segments from the file.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let file = std::fs::File::open(path).map_err(|source| ImageError::Read { path: path.to_owned(), source })?;
        Self::from_file(path, file)
    }

    /// As [`open`](Self::open), from a file already open (`path` names it in errors).
    pub fn from_file(path: &Path, file: std::fs::File) -> Result<Self, ImageError> {
        use std::os::unix::fs::FileExt;
        let read_err = |source| ImageError::Read { path: path.to_owned(), source };
        let len = file.metadata().map_err(read_err)?.len();
        let mut head = vec![0u8; len.min(HEAD_READ) as usize];
        file.read_exact_at(&mut head, 0).map_err(read_err)?;
        // Program headers beyond the first 64 KiB: read up to their end.
        if head.len() >= 64 {
            let phoff = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes"));
            let phnum = u64::from(u16::from_le_bytes([head[56], head[57]]));
            let table_end = phoff.saturating_add(phnum * 56).min(len);
            if table_end > head.len() as u64 {
                let start = head.len();
                head.resize(table_end as usize, 0);
                file.read_exact_at(&mut head[start..], start as u64).map_err(read_err)?;
            }
        }
        Self::validate(path, &head, len, Source::File(file))
    }

    /// Validates ELF bytes held in memory; `path` only names the image in errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, ImageError> {
        let len = bytes.len() as u64;
        let head = bytes.clone();
        Self::validate(path, &head, len, Source::Bytes(bytes))
    }

    /// Validates the headers in `bytes` (the start of a file of `file_len` bytes).
    fn validate(path: &Path, bytes: &[u8], file_len: u64, source: Source) -> Result<Self, ImageError> {
        let not_elf = |why: String| ImageError::NotX86_64Elf { path: path.to_owned(), why };
        let malformed = |why: String| ImageError::Malformed { path: path.to_owned(), why };
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(not_elf("no ELF magic number".into()));
        }
        if bytes.get(4) != Some(&2) {
            return Err(not_elf("not a 64-bit ELF".into()));
        }
        if bytes.get(5) != Some(&1) {
            return Err(not_elf("not little-endian".into()));
        }
        let header = FileHeader64::<Endianness>::parse(bytes).map_err(|e| malformed(format!("ELF header: {e}")))?;
        let endian = header.endian().map_err(|e| malformed(format!("ELF header: {e}")))?;
        let machine = header.e_machine(endian);
        if machine != EM_X86_64 {
            return Err(not_elf(format!("machine type {machine} (x86-64 is {EM_X86_64})")));
        }
        match header.e_type(endian) {
            ET_EXEC => {}
            ET_DYN => {
                return Err(malformed(
                    "it is position-independent (ET_DYN); link the guest at a fixed address \
                     (-C relocation-model=static)"
                        .into(),
                ));
            }
            other => return Err(malformed(format!("ELF type {other} is not an executable"))),
        }
        let entry = header.e_entry(endian);
        let phdrs = header.program_headers(endian, bytes).map_err(|e| malformed(format!("program headers: {e}")))?;

        let mut segments = Vec::new();
        let (mut end, mut entry_ok) = (0u64, false);
        for ph in phdrs.iter().filter(|ph| ph.p_type(endian) == PT_LOAD) {
            let (addr, memsz, filesz) = (ph.p_vaddr(endian), ph.p_memsz(endian), ph.p_filesz(endian));
            let offset = ph.p_offset(endian);
            if ph.p_paddr(endian) != addr {
                return Err(malformed(format!("segment at {addr:#x} has a different physical address")));
            }
            if filesz > memsz {
                return Err(malformed(format!("segment at {addr:#x} has more file bytes than memory bytes")));
            }
            if addr < IMAGE_BASE {
                return Err(malformed(format!(
                    "segment at {addr:#x} lies below the image base {IMAGE_BASE:#x} (link the guest with link.ld)"
                )));
            }
            let seg_end = addr.checked_add(memsz).filter(|&e| e <= MAX_MEMORY);
            let Some(seg_end) = seg_end else {
                return Err(malformed(format!("segment at {addr:#x} of {memsz:#x} bytes ends beyond guest RAM")));
            };
            let file_range = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(filesz).ok())
                .filter(|&(o, n)| o.checked_add(n).is_some_and(|e| e as u64 <= file_len));
            let Some((offset, file_size)) = file_range else {
                return Err(malformed(format!("segment at {addr:#x} points past the end of the file")));
            };
            if let Some(prev) = segments.iter().find(|s: &&Segment| s.addr < seg_end && addr < s.mem_end) {
                return Err(malformed(format!("segments at {:#x} and {addr:#x} overlap", prev.addr)));
            }
            if ph.p_flags(endian) & PF_X != 0 && (addr..seg_end).contains(&entry) {
                entry_ok = true;
            }
            end = end.max(seg_end);
            segments.push(Segment { addr, mem_end: seg_end, offset, file_size });
        }
        if segments.is_empty() {
            return Err(malformed("no loadable segment".into()));
        }
        if !entry_ok {
            return Err(malformed(format!("entry point {entry:#x} is not in an executable segment")));
        }
        // Load in address order, so that a segment sharing a page with the one before it is
        // written after that page was mapped and its tail zeroed.
        segments.sort_by_key(|s| s.addr);
        Ok(Self { path: path.to_owned(), source, entry, end, segments })
    }

    /// The entry point.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// One past the image's highest address, rounded up to a page.
    pub fn end(&self) -> u64 {
        self.end.next_multiple_of(PAGE_SIZE)
    }

    /// The path it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the image and a minimal heap fit in `memory_size` bytes of RAM.
    pub fn check_fits(&self, memory_size: u64) -> Result<(), ImageError> {
        let need = self.end() + MIN_FREE_MEMORY;
        if need > memory_size {
            return Err(ImageError::TooLarge {
                path: self.path.clone(),
                end: self.end,
                memory_mib: memory_size >> 20,
                need_mib: need.div_ceil(2 << 20) * 2,
                min_free_kib: MIN_FREE_MEMORY >> 10,
            });
        }
        Ok(())
    }

    /// Puts the segments into guest memory (which must be fresh, hence zero), from a file as
    /// `backing` says (see [`Backing`]); from bytes, by copying.
    pub fn load(&self, mem: &GuestMemoryMmap, backing: Backing) -> Result<(), ImageError> {
        let load_err = |source| ImageError::Load { path: self.path.clone(), source };
        for s in &self.segments {
            // The whole segment must lie in guest RAM (check_fits ensures it for a VM that
            // passed it; this keeps `load` safe on its own).
            let span = (s.mem_end - s.addr) as usize;
            let host = mem.get_slice(GuestAddress(s.addr), span).map_err(load_err)?.ptr_guard_mut().as_ptr();
            match &self.source {
                Source::File(file)
                    if backing == Backing::PageCache
                        && s.addr.is_multiple_of(PAGE_SIZE)
                        && (s.offset as u64).is_multiple_of(PAGE_SIZE) =>
                {
                    map_segment(file, s, host, span).map_err(|e| load_err(vm_memory::GuestMemoryError::IOError(e)))?;
                }
                Source::File(file) => {
                    use std::os::unix::fs::FileExt;
                    // SAFETY: `host` is the start of the segment's `span` bytes of guest RAM
                    // (checked above) and `file_size <= span`; the VM does not run yet and
                    // nothing else refers to those bytes while the file is read into them.
                    let dst = unsafe { std::slice::from_raw_parts_mut(host, s.file_size) };
                    file.read_exact_at(dst, s.offset as u64)
                        .map_err(|e| load_err(vm_memory::GuestMemoryError::IOError(e)))?;
                }
                Source::Bytes(bytes) => {
                    mem.write_slice(&bytes[s.offset..s.offset + s.file_size], GuestAddress(s.addr))
                        .map_err(load_err)?;
                }
            }
        }
        Ok(())
    }

    /// The demangled name of the function containing `addr` and the offset into it, if the
    /// image has a symbol table that covers it. Reads the whole file (failure path only).
    pub fn symbolize(&self, addr: u64) -> Option<(String, u64)> {
        let owned;
        let bytes: &[u8] = match &self.source {
            Source::Bytes(b) => b,
            Source::File(file) => {
                use std::os::unix::fs::FileExt;
                let len = file.metadata().ok()?.len();
                let mut buf = vec![0u8; usize::try_from(len).ok()?];
                file.read_exact_at(&mut buf, 0).ok()?;
                owned = buf;
                &owned
            }
        };
        let header = FileHeader64::<LittleEndian>::parse(bytes).ok()?;
        let sections = header.sections(LittleEndian, bytes).ok()?;
        let symbols = sections.symbols(LittleEndian, bytes, SHT_SYMTAB).ok()?;
        let sym = symbols.iter().find(|s| {
            let (start, size) = (s.st_value(LittleEndian), s.st_size(LittleEndian));
            s.st_type() == STT_FUNC && start <= addr && addr < start.saturating_add(size.max(1))
        })?;
        let name = sym.name(LittleEndian, symbols.strings()).ok()?;
        let name = String::from_utf8_lossy(name);
        Some((format!("{:#}", rustc_demangle::demangle(&name)), addr - sym.st_value(LittleEndian)))
    }
}

/// How [`GuestImage::load`] puts a file's segments into guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Page-aligned segments are mapped privately over guest RAM (`MAP_FIXED`): their pages
    /// come from the page cache, shared by every VM running this guest, and one is copied
    /// only when the guest writes it. Each 4 KiB page the guest touches first costs it a
    /// shadow-page fault, ~10-30 us under PVM: right for a guest that runs little of its code.
    PageCache,
    /// The segments are read into guest RAM: private to the VM, but backed like the rest of
    /// RAM, so that with huge pages one fault brings in 2 MiB of code. A guest running a
    /// component executes much of its 1.5 MB image (wasmtime's runtime): ~230 faults, ~4.5 ms
    /// of a CPython run, become a handful.
    Copy,
}

/// Maps the file bytes of segment `s` privately over guest RAM at `host` (the segment's
/// `span` bytes, checked to lie in RAM), zeroing what the last page holds beyond them.
fn map_segment(file: &std::fs::File, s: &Segment, host: *mut u8, span: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let page = PAGE_SIZE as usize;
    let map_len = s.file_size.next_multiple_of(page).min(span.next_multiple_of(page));
    if map_len == 0 {
        return Ok(());
    }
    // SAFETY: `host..host + span` is guest RAM owned by the VMM's mapping (checked by the
    // caller through vm-memory) and page-aligned; `map_len` does not pass the page holding the
    // segment's end, which is RAM too (RAM is a whole number of 2 MiB pages). Replacing those
    // pages with a private file mapping keeps them readable and writable for KVM and the VMM;
    // nothing holds references into them while the VM is being built.
    let mapped = unsafe {
        libc::mmap(
            host.cast(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            file.as_raw_fd(),
            s.offset as libc::off_t,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // File bytes past the segment's file size that share its last page must read as zero.
    let tail = map_len - s.file_size;
    if tail > 0 {
        // SAFETY: `host + file_size .. host + map_len` lies in the mapping just made.
        unsafe { std::ptr::write_bytes(host.add(s.file_size), 0, tail) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD segment.
    fn elf(machine: u16, e_type: u16, vaddr: u64, filesz: u64, memsz: u64, flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little-endian
        b[6] = 1; // version
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&vaddr.to_le_bytes()); // entry
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut b[64..120];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&flags.to_le_bytes());
        ph[8..16].copy_from_slice(&0x800u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
        ph[24..32].copy_from_slice(&vaddr.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        b[0x800] = 0xe6; // out imm8, al
        b
    }

    fn parse(bytes: Vec<u8>) -> Result<GuestImage, ImageError> {
        GuestImage::parse(Path::new("test.elf"), bytes)
    }

    #[test]
    fn accepts_a_fixed_address_x86_64_executable() {
        let img = parse(elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 16, 0x3000, PF_X)).unwrap();
        assert_eq!(img.entry(), IMAGE_BASE);
        assert_eq!(img.end(), IMAGE_BASE + 0x3000);
        img.check_fits(4 << 20).unwrap();
        let err = img.check_fits(2 << 20).unwrap_err().to_string();
        assert!(err.contains("does not fit in 2 MiB") && err.contains("raise --memory"), "{err}");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        img.load(&mem, Backing::PageCache).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(IMAGE_BASE)).unwrap(), 0xe6);
    }

    #[test]
    fn a_file_image_reads_the_same_mapped_or_copied() {
        // Two segments: code on the first page, data from the second page on, with a
        // zero-filled tail past its file bytes; the file holds bytes beyond that tail.
        let mut b = elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 16, 0x1000, PF_X);
        b.resize(0x3000, 0);
        for (i, byte) in b[0x2000..].iter_mut().enumerate() {
            *byte = (i % 251) as u8 + 1;
        }
        // A second program header (the table holds room for it) for the data segment.
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = 64 + 56;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&6u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x2000u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&(IMAGE_BASE + 0x1000).to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&(IMAGE_BASE + 0x1000).to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&0x800u64.to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&0x3000u64.to_le_bytes());
        let dir = std::env::temp_dir().join(format!("wasmvisor-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.elf");
        std::fs::write(&path, &b).unwrap();
        let img = GuestImage::open(&path).unwrap();
        let mut seen = Vec::new();
        for backing in [Backing::PageCache, Backing::Copy] {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            img.load(&mem, backing).unwrap();
            let mut bytes = vec![0u8; 0x4000];
            mem.read_slice(&mut bytes, GuestAddress(IMAGE_BASE)).unwrap();
            assert_eq!(bytes[0], 0xe6, "{backing:?}");
            assert_eq!(&bytes[0x1000..0x1800], &b[0x2000..0x2800], "{backing:?}: file bytes");
            assert!(bytes[0x1800..].iter().all(|&x| x == 0), "{backing:?}: the tail reads zero");
            seen.push(bytes);
        }
        assert_eq!(seen[0], seen[1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_what_is_not_an_x86_64_executable() {
        let msg = |b| parse(b).unwrap_err().to_string();
        assert!(msg(b"#!/bin/sh\n".to_vec()).contains("no ELF magic number"));
        assert!(msg(vec![]).contains("no ELF magic number"));
        let mut b32 = elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 16, 16, PF_X);
        b32[4] = 1;
        assert!(msg(b32).contains("not a 64-bit ELF"));
        assert!(msg(elf(183, ET_EXEC, IMAGE_BASE, 16, 16, PF_X)).contains("machine type 183"));
        assert!(msg(elf(EM_X86_64, ET_DYN, IMAGE_BASE, 16, 16, PF_X)).contains("position-independent"));
        assert!(msg(elf(EM_X86_64, ET_EXEC, 0x1000, 16, 16, PF_X)).contains("below the image base"));
        assert!(msg(elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 32, 16, PF_X)).contains("more file bytes"));
        assert!(msg(elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 0x10_0000, 0x10_0000, PF_X)).contains("past the end"));
        assert!(msg(elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 16, u64::MAX, PF_X)).contains("beyond guest RAM"));
        assert!(msg(elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 16, 16, 4)).contains("not in an executable segment"));
        let mut truncated = elf(EM_X86_64, ET_EXEC, IMAGE_BASE, 16, 16, PF_X);
        truncated.truncate(40);
        assert!(msg(truncated).contains("malformed"));
    }

    #[test]
    fn missing_file_is_named() {
        let err = GuestImage::open(Path::new("/nonexistent/guest")).unwrap_err().to_string();
        assert!(err.contains("cannot read guest image /nonexistent/guest"), "{err}");
    }
}
