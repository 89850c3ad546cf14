//! Snapshots of a component's ready state: the file format, writing one at the guest's `Ready`
//! hypercall, and mapping one back as a new VM's RAM.
//!
//! A VM booted with `BOOT_FLAG_SNAPSHOT` stops at `Ready` once its engine is built and its
//! component deserialized and linked, before it reads anything of the tenant's. There the vCPU
//! thread ([`write()`]) saves the vCPU's registers and extended state, the vsock device's
//! transport and queues, and every guest RAM page that is not zero (a fresh VM's RAM is zero),
//! with the `BootInfo` area left out: the restore writes the launch's own.
//!
//! The file: a preamble (magic, header length, BLAKE3 of the header and the RAM data), the
//! header ([`Header`], postcard), and from [`RAM_OFFSET`] the RAM image, sparse: page `gpa` of
//! guest RAM at `RAM_OFFSET + gpa`, holes where RAM is zero. A restore ([`Snapshot::open`])
//! checks the header against what the launch is (wasmvisor version, component, guest image,
//! CPU features and mask, memory size, TSC frequency, HTTP and vsock) and the checksum; one
//! that does not match or verify is an error, never used, and the caller makes a new one. It
//! then maps each 2 MiB of RAM that holds data `MAP_PRIVATE` from the file
//! ([`Snapshot::map_ram`]): instances of a component share its clean pages through the page
//! cache, and a page an instance writes becomes its own copy. The rest of RAM is fresh
//! anonymous memory, as in a boot.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wasmvisor_abi::layout::{BOOT_DATA_END, BOOT_INFO_GPA, LARGE_PAGE_SIZE, PAGE_SIZE};

use crate::devices::virtio::vsock::DeviceSnapshot;

/// The file's first bytes (the last is the format's version).
pub const MAGIC: [u8; 8] = *b"WVSNAP\0\x01";
/// Where the RAM image starts in the file: 2 MiB, so that its huge pages line up with RAM's.
pub const RAM_OFFSET: u64 = LARGE_PAGE_SIZE;
/// Magic, header length, checksum.
const PREAMBLE: usize = 8 + 8 + 32;

/// Why a snapshot could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a snapshot of this format, or is damaged.
    #[error("snapshot {path} is not usable: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The snapshot is of something else than this launch.
    #[error("snapshot {path} does not match this launch: its {what} differs")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Which part of its identity.
        what: &'static str,
    },
    /// The VM could not be snapshotted at this point.
    #[error("cannot snapshot the VM: {0}")]
    Capture(String),
}

/// What the caller knows a snapshot must be of, beyond what the VM's config says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotKey {
    /// The component artifact's name in the content-addressed cache: the component's digest,
    /// the engine's version and settings and the ISA flags it was compiled with.
    pub component: String,
    /// The CPU features the guest detects (a `FeatureSet`'s bits): the guest keeps what it
    /// detected at boot, so a snapshot is only for a CPU that shows the same.
    pub cpu_features: u64,
}

/// What a launch does with a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotMode {
    /// Boot, and write a snapshot when the component is ready (then go on).
    Make,
    /// Boot, write the snapshot when the component is ready, and stop the VM there (exit 0):
    /// a supervisor making snapshots in the background.
    MakeOnly,
    /// Start from the snapshot instead of booting.
    Restore,
}

/// How a restore brings the snapshot's RAM into the new VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RamRestore {
    /// Copy it into fresh huge-page RAM ([`Snapshot::copy_ram`]): each instance holds its own
    /// copy, and the guest's first touch of each 2 MiB is one fault, as in a boot. The default:
    /// under PVM it starts a hello component in a fifth of the time `Shared` takes.
    #[default]
    Copied,
    /// Map it `MAP_PRIVATE` from the file ([`Snapshot::map_ram`]): instances share the clean
    /// pages through the page cache; each 4 KiB page the guest touches first costs a fault (a
    /// host one, and under PVM a shadow one, ~10-30 us), a written one a copy as well.
    Shared,
}

/// A snapshot to make or to start from.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SnapshotPlan {
    /// Make or restore.
    pub mode: SnapshotMode,
    /// The file: for `Make`, written in place (the caller renames it when the run says it was
    /// made); for `Restore`, read.
    pub path: PathBuf,
    /// What it must be of.
    pub key: SnapshotKey,
    /// For `Restore`: the caller has verified this file's checksum already (a daemon does so
    /// once per file it made), so the launch checks the header only.
    pub verified: bool,
    /// For `Restore`: how the RAM comes back.
    #[serde(default)]
    pub ram: RamRestore,
}

/// Everything a snapshot is pinned to; a restore compares all of it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The wasmvisor version that wrote it.
    pub version: String,
    /// The caller's part.
    pub key: SnapshotKey,
    /// The guest image (see `GuestImage::identity`).
    pub guest_image: String,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// Features the guest was told to treat as absent.
    pub cpu_features_masked: u64,
    /// The TSC frequency the guest was told.
    pub tsc_khz: u64,
    /// An HTTP handler (its device was up at the snapshot).
    pub http: bool,
    /// The VM has the vsock device.
    pub vsock: bool,
    /// The exception-reporting IDT is installed.
    pub exception_handlers: bool,
}

impl Identity {
    /// The first part in which `self` (the file's) differs from `want` (the launch's).
    fn differs_from(&self, want: &Self) -> Option<&'static str> {
        let parts: [(&'static str, bool); 10] = [
            ("wasmvisor version", self.version == want.version),
            ("component", self.key.component == want.key.component),
            ("CPU features", self.key.cpu_features == want.key.cpu_features),
            ("guest image", self.guest_image == want.guest_image),
            ("memory size", self.memory_size == want.memory_size),
            ("CPU feature mask", self.cpu_features_masked == want.cpu_features_masked),
            // 0: not known yet (it is read from the vCPU, and compared then).
            ("TSC frequency", want.tsc_khz == 0 || self.tsc_khz == want.tsc_khz),
            ("HTTP mode", self.http == want.http),
            ("vsock device", self.vsock == want.vsock),
            ("exception handlers", self.exception_handlers == want.exception_handlers),
        ];
        parts.into_iter().find(|(_, same)| !same).map(|(what, _)| what)
    }
}

/// The general-purpose registers, RIP and RFLAGS.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registers(pub [u64; 18]);

impl Registers {
    fn of(r: &kvm_bindings::kvm_regs) -> Self {
        Self([
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15, r.rip, r.rflags,
        ])
    }

    fn to_kvm(&self) -> kvm_bindings::kvm_regs {
        let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] = self.0;
        kvm_bindings::kvm_regs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip,
            rflags,
        }
    }
}

/// The header: identity, vCPU and device state, and where RAM has data.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// What it is of.
    pub identity: Identity,
    /// The vCPU's registers, past the `Ready` hypercall.
    pub regs: Registers,
    /// FS and GS bases (the guest may set them at CPL 3: CR4.FSGSBASE).
    pub fs_base: u64,
    /// See `fs_base`.
    pub gs_base: u64,
    /// The `KVM_GET_XSAVE` area (x87, SSE, AVX state).
    pub xsave: Vec<u32>,
    /// The vsock device, if the VM has one.
    pub device: Option<DeviceSnapshot>,
    /// Runs of guest RAM with data: `(gpa, len)`, page-aligned, ascending, disjoint.
    pub extents: Vec<(u64, u64)>,
}

/// A snapshot opened and checked for a launch.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    file: std::fs::File,
    /// Its header.
    pub header: Header,
}

/// Where the VMM keeps its own structures (GDT, IDT, TSS, exception stubs, page tables,
/// exception stack): a restore into a VM that has them already (a pre-booted one) requires
/// the snapshot's to be the same, since KVM shadows the page tables and must not see them
/// change under it.
pub const SYSTEM_AREA: std::ops::Range<u64> = wasmvisor_abi::layout::GDT_GPA..wasmvisor_abi::layout::BOOT_INFO_GPA;

/// The guest-physical pages a snapshot leaves out (the restore writes them): `BootInfo` and
/// the boot data area, which hold the launch's strings and seed.
fn left_out(gpa: u64) -> bool {
    (BOOT_INFO_GPA..BOOT_DATA_END).contains(&gpa)
}

/// The vCPU state [`write()`] saves, read on the vCPU thread.
pub struct VcpuState {
    /// Registers past the hypercall.
    pub regs: kvm_bindings::kvm_regs,
    /// FS base.
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// The XSAVE area.
    pub xsave: kvm_bindings::kvm_xsave,
}

/// Writes the snapshot of a VM stopped at its `Ready` hypercall to `file` (sized by the caller
/// to at least `RAM_OFFSET` + RAM): its RAM pages with data, then the header and checksum.
/// Only resident pages are looked at (the others are zero).
pub fn write(
    file: &std::fs::File,
    path: &Path,
    identity: Identity,
    vcpu: &VcpuState,
    device: Option<DeviceSnapshot>,
    mem: &GuestMemoryMmap,
) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::Io { path: path.to_owned(), source };
    let extents = data_extents(mem);
    let header = Header {
        identity,
        regs: Registers::of(&vcpu.regs),
        fs_base: vcpu.fs_base,
        gs_base: vcpu.gs_base,
        xsave: vcpu.xsave.region.to_vec(),
        device,
        extents,
    };
    let body = postcard::to_stdvec(&header).map_err(|e| SnapshotError::Capture(format!("encode the header: {e}")))?;
    if PREAMBLE + body.len() > RAM_OFFSET as usize {
        return Err(SnapshotError::Capture(format!("the header is {} bytes, too large", body.len())));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&body);
    let mut bytes = 0;
    for &(gpa, len) in &header.extents {
        let slice =
            mem.get_slice(GuestAddress(gpa), len as usize).map_err(|e| SnapshotError::Capture(e.to_string()))?;
        let guard = slice.ptr_guard();
        // SAFETY: the slice is guest RAM, mapped for as long as `mem` lives; the guest is
        // stopped (this runs on its vCPU thread, at an exit) and the device has no connection,
        // so nothing writes it while it is read.
        let data = unsafe { std::slice::from_raw_parts(guard.as_ptr(), len as usize) };
        hasher.update(data);
        file.write_all_at(data, RAM_OFFSET + gpa).map_err(io)?;
        bytes += len;
    }
    let mut head = Vec::with_capacity(PREAMBLE + body.len());
    head.write_all(&MAGIC).map_err(io)?;
    head.write_all(&(body.len() as u64).to_le_bytes()).map_err(io)?;
    head.write_all(hasher.finalize().as_bytes()).map_err(io)?;
    head.write_all(&body).map_err(io)?;
    file.write_all_at(&head, 0).map_err(io)?;
    Ok(bytes)
}

/// The runs of guest RAM pages that are resident and not zero, except the left-out area.
fn data_extents(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        let Ok(slice) = region.get_slice(vm_memory::MemoryRegionAddress(0), len) else { continue };
        let guard = slice.ptr_guard();
        let base = guard.as_ptr();
        let resident = crate::memory::resident_map(region);
        for (i, r) in resident.iter().enumerate() {
            let gpa = region.start_addr().0 + (i as u64) * PAGE_SIZE;
            if !r || left_out(gpa) {
                continue;
            }
            // SAFETY: page `i` lies inside the mapping (i < pages, and RAM sizes are whole
            // pages); the guest is stopped, so it does not change while it is read.
            let page = unsafe { std::slice::from_raw_parts(base.add(i * PAGE_SIZE as usize), PAGE_SIZE as usize) };
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            match extents.last_mut() {
                Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
                _ => extents.push((gpa, PAGE_SIZE)),
            }
        }
    }
    extents
}

impl Snapshot {
    /// Opens the snapshot at `path` for a launch that is `want`: reads the header, compares the
    /// identity, checks the extents against `want.memory_size` and, unless `verified`, the
    /// checksum over the header and all RAM data.
    pub fn open(path: &Path, want: &Identity, verified: bool) -> Result<Self, SnapshotError> {
        let file = std::fs::File::open(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), source })?;
        Self::from_file(path, file, want, verified)
    }

    /// The header of the snapshot at `path`, read without any check of what it is of or of its
    /// checksum (tests and tools that look inside one).
    pub fn open_unchecked(path: &Path) -> Result<Header, SnapshotError> {
        let file = std::fs::File::open(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), source })?;
        Self::load(path, file, None, true).map(|s| s.header)
    }

    /// Checks the snapshot at `path` on its own: its format, its extents and its checksum
    /// (what it is of is for a launch to compare).
    pub fn verify(path: &Path) -> Result<(), SnapshotError> {
        let file = std::fs::File::open(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), source })?;
        Self::load(path, file, None, false).map(drop)
    }

    /// As [`open`](Self::open), from a file already open.
    pub fn from_file(path: &Path, file: std::fs::File, want: &Identity, verified: bool) -> Result<Self, SnapshotError> {
        Self::load(path, file, Some(want), verified)
    }

    fn load(path: &Path, file: std::fs::File, want: Option<&Identity>, verified: bool) -> Result<Self, SnapshotError> {
        let invalid = |why: String| SnapshotError::Invalid { path: path.to_owned(), why };
        let io = |source| SnapshotError::Io { path: path.to_owned(), source };
        let file_len = file.metadata().map_err(io)?.len();
        let mut pre = [0u8; PREAMBLE];
        file.read_exact_at(&mut pre, 0).map_err(|e| invalid(format!("cannot read its preamble: {e}")))?;
        if pre[..8] != MAGIC {
            return Err(invalid("not a wasmvisor snapshot of this format (bad magic)".into()));
        }
        let body_len = u64::from_le_bytes(pre[8..16].try_into().expect("8 bytes"));
        if body_len == 0 || PREAMBLE as u64 + body_len > RAM_OFFSET {
            return Err(invalid(format!("header length {body_len} out of range")));
        }
        let mut body = vec![0u8; body_len as usize];
        file.read_exact_at(&mut body, PREAMBLE as u64).map_err(|e| invalid(format!("cannot read its header: {e}")))?;
        let header: Header = postcard::from_bytes(&body).map_err(|e| invalid(format!("bad header: {e}")))?;
        if let Some(what) = want.and_then(|want| header.identity.differs_from(want)) {
            return Err(SnapshotError::Mismatch { path: path.to_owned(), what });
        }
        let memory_size = want.map_or(header.identity.memory_size, |w| w.memory_size);
        if header.xsave.len() != 1024 {
            return Err(invalid(format!("XSAVE area of {} words", header.xsave.len())));
        }
        let mut end = 0u64;
        for &(gpa, len) in &header.extents {
            let aligned = gpa % PAGE_SIZE == 0 && len % PAGE_SIZE == 0 && len > 0;
            let fits = gpa.checked_add(len).is_some_and(|e| e <= memory_size);
            if !aligned || !fits || gpa < end || left_out(gpa) {
                return Err(invalid(format!("bad RAM extent {gpa:#x}+{len:#x}")));
            }
            end = gpa + len;
        }
        if file_len < RAM_OFFSET + end.next_multiple_of(LARGE_PAGE_SIZE).min(memory_size) {
            return Err(invalid(format!("the file is {file_len} bytes, shorter than its RAM image")));
        }
        if !verified {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&body);
            let mut buf = vec![0u8; 1 << 20];
            for &(gpa, len) in &header.extents {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], RAM_OFFSET + gpa + done)
                        .map_err(|e| invalid(format!("cannot read its RAM image: {e}")))?;
                    hasher.update(&buf[..n]);
                    done += n as u64;
                }
            }
            if hasher.finalize().as_bytes() != &pre[16..48] {
                return Err(invalid("its checksum does not verify (damaged or altered)".into()));
            }
        }
        Ok(Self { path: path.to_owned(), file, header })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps every 2 MiB of `mem` that holds snapshot data `MAP_PRIVATE` from the file, over
    /// the fresh anonymous RAM there (before KVM is given the RAM). Returns the bytes mapped.
    pub fn map_ram(&self, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
        use std::os::fd::AsRawFd;
        let mut chunks: Vec<u64> = Vec::new();
        for &(gpa, len) in &self.header.extents {
            let mut chunk = gpa - gpa % LARGE_PAGE_SIZE;
            while chunk < gpa + len {
                if chunks.last() != Some(&chunk) {
                    chunks.push(chunk);
                }
                chunk += LARGE_PAGE_SIZE;
            }
        }
        let end = mem.last_addr().0 + 1;
        let mut mapped = 0;
        for chunk in chunks {
            let len = LARGE_PAGE_SIZE.min(end - chunk);
            let host = mem.get_host_address(GuestAddress(chunk)).map_err(|e| SnapshotError::Capture(e.to_string()))?;
            // SAFETY: `[host, host + len)` lies inside guest RAM's mapping, which KVM does not
            // know yet and nothing else references; MAP_FIXED replaces those pages with a
            // private copy-on-write mapping of the file's RAM image at the same offset, which
            // the file covers (checked at open). The mapping goes with guest RAM's munmap.
            let ptr = unsafe {
                libc::mmap(
                    host.cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    self.file.as_raw_fd(),
                    (RAM_OFFSET + chunk) as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(SnapshotError::Io { path: self.path.clone(), source: std::io::Error::last_os_error() });
            }
            // Clean pages may come as 2 MiB page-cache folios, one shadow fault each.
            // SAFETY: the range is the mapping just made; the advice changes only its backing.
            unsafe { libc::madvise(ptr, len as usize, libc::MADV_HUGEPAGE) };
            mapped += len;
        }
        Ok(mapped)
    }

    /// Whether the snapshot's system area ([`SYSTEM_AREA`]) is what `mem` holds.
    pub fn same_system_area(&self, mem: &GuestMemoryMmap) -> Result<bool, SnapshotError> {
        let len = (SYSTEM_AREA.end - SYSTEM_AREA.start) as usize;
        let mut ours = vec![0u8; len];
        vm_memory::Bytes::read_slice(mem, &mut ours, GuestAddress(SYSTEM_AREA.start))
            .map_err(|e| SnapshotError::Capture(e.to_string()))?;
        let mut theirs = vec![0u8; len];
        for &(gpa, extent) in &self.header.extents {
            let (start, end) = (gpa.max(SYSTEM_AREA.start), (gpa + extent).min(SYSTEM_AREA.end));
            if start < end {
                let at = (start - SYSTEM_AREA.start) as usize;
                self.file
                    .read_exact_at(&mut theirs[at..at + (end - start) as usize], RAM_OFFSET + start)
                    .map_err(|source| SnapshotError::Io { path: self.path.clone(), source })?;
            }
        }
        Ok(ours == theirs)
    }

    /// Makes `mem` — the RAM of a VM whose guest has run (a pre-booted one), stopped — hold the
    /// snapshot's RAM: its data copied in, and every other page that is resident zeroed (whole
    /// 2 MiB runs given back with `MADV_DONTNEED`), except the system area (the same, checked
    /// with [`same_system_area`](Self::same_system_area)) and the BootInfo area (rewritten by
    /// the launch). Returns the bytes copied and the bytes zeroed.
    pub fn overwrite_ram(&self, mem: &GuestMemoryMmap) -> Result<(u64, u64), SnapshotError> {
        let capture = |e: String| SnapshotError::Capture(e);
        let io = |source| SnapshotError::Io { path: self.path.clone(), source };
        let keep = |gpa: u64| SYSTEM_AREA.contains(&gpa) || left_out(gpa);
        let mut copied = 0;
        let mut zeroed = 0;
        for region in mem.iter() {
            let base = region.start_addr().0;
            let len = region.len();
            let slice = region
                .get_slice(vm_memory::MemoryRegionAddress(0), len as usize)
                .map_err(|e| capture(e.to_string()))?;
            let guard = slice.ptr_guard_mut();
            let host = guard.as_ptr();
            let pages = len.div_ceil(PAGE_SIZE) as usize;
            // Pages to zero: resident, not the snapshot's, not kept. The snapshot's pages are
            // marked as they are read in.
            let mut stale = crate::memory::resident_map(region);
            for (page, s) in stale.iter_mut().enumerate() {
                *s = *s && !keep(base + page as u64 * PAGE_SIZE);
            }
            for &(gpa, extent) in &self.header.extents {
                let (start, end) = (gpa.max(base), (gpa + extent).min(base + len));
                if start >= end {
                    continue;
                }
                let (first, count) = (((start - base) / PAGE_SIZE) as usize, ((end - start) / PAGE_SIZE) as usize);
                stale[first..first + count].fill(false);
                // SAFETY: the run lies inside the mapping; the guest is stopped and KVM reaches
                // these pages only through this same host mapping.
                let into = unsafe {
                    std::slice::from_raw_parts_mut(host.add(first * PAGE_SIZE as usize), count * PAGE_SIZE as usize)
                };
                self.file.read_exact_at(into, RAM_OFFSET + start).map_err(io)?;
                copied += end - start;
            }
            // Whole 2 MiB chunks with nothing of the snapshot's go back to the kernel (zero when
            // next touched); the rest is zeroed in runs.
            let per_chunk = (LARGE_PAGE_SIZE / PAGE_SIZE) as usize;
            let mut page = 0;
            while page < pages {
                if !stale[page] {
                    page += 1;
                    continue;
                }
                let mut run_end = page;
                while run_end < pages && stale[run_end] {
                    run_end += 1;
                }
                // SAFETY: `[page, run_end)` lies inside the mapping; as above.
                let at = unsafe { host.add(page * PAGE_SIZE as usize) };
                let bytes = (run_end - page) * PAGE_SIZE as usize;
                if page % per_chunk == 0 && (run_end - page) % per_chunk == 0 {
                    // SAFETY: whole chunks of the mapping; they read as zero when next touched.
                    unsafe { libc::madvise(at.cast(), bytes, libc::MADV_DONTNEED) };
                    zeroed += bytes as u64;
                } else {
                    // Most of these are zero already (a huge page is resident whole, though
                    // the pre-booted guest wrote a few of its pages, which the snapshot's
                    // maker wrote too): reading is cheaper than writing them all.
                    for p in page..run_end {
                        // SAFETY: page `p` lies inside the mapping; as above.
                        let words = unsafe {
                            std::slice::from_raw_parts_mut(
                                host.add(p * PAGE_SIZE as usize).cast::<u64>(),
                                PAGE_SIZE as usize / 8,
                            )
                        };
                        if words.iter().any(|w| *w != 0) {
                            words.fill(0);
                            zeroed += PAGE_SIZE;
                        }
                    }
                }
                page = run_end;
            }
        }
        Ok((copied, zeroed))
    }

    /// Copies the snapshot's RAM data into `mem` (fresh, zero RAM, before KVM is given it).
    /// Returns the bytes copied.
    pub fn copy_ram(&self, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
        let mut copied = 0;
        for &(gpa, len) in &self.header.extents {
            let slice =
                mem.get_slice(GuestAddress(gpa), len as usize).map_err(|e| SnapshotError::Capture(e.to_string()))?;
            let guard = slice.ptr_guard_mut();
            // SAFETY: the slice is guest RAM that nothing else references yet (KVM does not
            // know it); the extent lies within it (checked at open, and by `get_slice`).
            let into = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len as usize) };
            self.file
                .read_exact_at(into, RAM_OFFSET + gpa)
                .map_err(|source| SnapshotError::Io { path: self.path.clone(), source })?;
            copied += len;
        }
        Ok(copied)
    }

    /// The vCPU state to set on the restored VM's vCPU.
    pub fn vcpu_state(&self) -> VcpuRestore {
        VcpuRestore {
            regs: self.header.regs.clone(),
            fs_base: self.header.fs_base,
            gs_base: self.header.gs_base,
            xsave: self.header.xsave.clone(),
        }
    }

    /// Sets the saved registers, FS/GS bases and XSAVE area on `vcpu` (set up as for a boot:
    /// the guest cannot change its system registers at CPL 3, so a boot's are the snapshot's).
    pub fn restore_vcpu(&self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), SnapshotError> {
        self.vcpu_state().apply(vcpu)
    }
}

/// A snapshot's vCPU state, on its way to the vCPU thread.
#[derive(Clone, Debug)]
pub struct VcpuRestore {
    regs: Registers,
    fs_base: u64,
    gs_base: u64,
    xsave: Vec<u32>,
}

impl VcpuRestore {
    /// Sets it on `vcpu`.
    pub fn apply(&self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), SnapshotError> {
        let fail = |what: &str, e: kvm_ioctls::Error| SnapshotError::Capture(format!("restore the vCPU's {what}: {e}"));
        let mut sregs = vcpu.get_sregs().map_err(|e| fail("special registers", e))?;
        if (sregs.fs.base, sregs.gs.base) != (self.fs_base, self.gs_base) {
            sregs.fs.base = self.fs_base;
            sregs.gs.base = self.gs_base;
            vcpu.set_sregs(&sregs).map_err(|e| fail("special registers", e))?;
        }
        let mut xsave = kvm_bindings::kvm_xsave::default();
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: a plain 4 KiB `kvm_xsave` with no extra area (KVM_SET_XSAVE reads only the
        // region), as `get_xsave` returned it when the snapshot was taken.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(|e| fail("XSAVE state", e))?;
        vcpu.set_regs(&self.regs.to_kvm()).map_err(|e| fail("registers", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            version: "1".into(),
            key: SnapshotKey { component: "c".into(), cpu_features: 3 },
            guest_image: "g".into(),
            memory_size: 8 << 20,
            cpu_features_masked: 0,
            tsc_khz: 1000,
            http: false,
            vsock: true,
            exception_handlers: true,
        }
    }

    fn vcpu_state() -> VcpuState {
        let regs = kvm_bindings::kvm_regs { rip: 0x20_1234, rsp: 0x1f_fff0, ..Default::default() };
        VcpuState { regs, fs_base: 7, gs_base: 0, xsave: kvm_bindings::kvm_xsave::default() }
    }

    fn written(dir: &Path) -> (PathBuf, GuestMemoryMmap) {
        let mem = crate::memory::create(8 << 20).unwrap();
        use vm_memory::Bytes;
        mem.write_obj(0xabu8, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0xcdu8, GuestAddress(0x4008)).unwrap();
        mem.write_obj(0xefu8, GuestAddress(0x40_0000)).unwrap();
        // The BootInfo area is left out; a touched zero page is a hole.
        mem.write_obj(0x11u8, GuestAddress(BOOT_INFO_GPA)).unwrap();
        mem.write_obj(0u8, GuestAddress(0x50_0000)).unwrap();
        let path = dir.join("s.snap");
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path).unwrap();
        file.set_len(RAM_OFFSET + (8 << 20)).unwrap();
        let n = write(&file, &path, identity(), &vcpu_state(), None, &mem).unwrap();
        assert_eq!(n, 3 * PAGE_SIZE);
        (path, mem)
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wasmvisor-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_snapshot_keeps_the_pages_with_data_and_maps_them_back_privately() {
        use vm_memory::Bytes;
        let d = dir("roundtrip");
        let (path, _) = written(&d);
        let snap = Snapshot::open(&path, &identity(), false).unwrap();
        assert_eq!(snap.header.extents, vec![(0x3000, 0x2000), (0x40_0000, 0x1000)]);
        assert_eq!(snap.header.regs.0[16], 0x20_1234);
        let mem = crate::memory::create(8 << 20).unwrap();
        assert_eq!(snap.map_ram(&mem).unwrap(), 2 * LARGE_PAGE_SIZE);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0xab);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4008)).unwrap(), 0xcd);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_0000)).unwrap(), 0xef);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(BOOT_INFO_GPA)).unwrap(), 0);
        // A write is private to this VM: the file, and a second restore, keep the original.
        mem.write_obj(0x99u8, GuestAddress(0x3000)).unwrap();
        let other = crate::memory::create(8 << 20).unwrap();
        snap.map_ram(&other).unwrap();
        assert_eq!(other.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0xab);
        Snapshot::open(&path, &identity(), false).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overwriting_a_used_vms_ram_leaves_the_snapshots_and_keeps_bootinfo() {
        use vm_memory::Bytes;
        let d = dir("overwrite");
        let (path, _) = written(&d);
        let snap = Snapshot::open(&path, &identity(), false).unwrap();
        // What a pre-booted guest left: over a page the snapshot has, beside one in the same
        // 2 MiB, in a 2 MiB the snapshot has nothing of, and in BootInfo (the launch's).
        let mem = crate::memory::create(8 << 20).unwrap();
        for (gpa, v) in [(0x3000, 0x11u8), (0x41_0000, 0x22), (0x60_0000, 0x33), (BOOT_INFO_GPA, 0x44)] {
            mem.write_obj(v, GuestAddress(gpa)).unwrap();
        }
        let (copied, _) = snap.overwrite_ram(&mem).unwrap();
        assert_eq!(copied, 3 * PAGE_SIZE);
        for (gpa, v) in
            [(0x3000, 0xabu8), (0x4008, 0xcd), (0x40_0000, 0xef), (0x41_0000, 0), (0x60_0000, 0), (BOOT_INFO_GPA, 0x44)]
        {
            assert_eq!(mem.read_obj::<u8>(GuestAddress(gpa)).unwrap(), v, "{gpa:#x}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_snapshot_of_something_else_or_damaged_is_refused() {
        let d = dir("refused");
        let (path, _) = written(&d);
        for (want, what) in [
            (Identity { memory_size: 16 << 20, ..identity() }, "memory size"),
            (Identity { tsc_khz: 999, ..identity() }, "TSC frequency"),
            (Identity { key: SnapshotKey { component: "d".into(), cpu_features: 3 }, ..identity() }, "component"),
            (Identity { key: SnapshotKey { component: "c".into(), cpu_features: 1 }, ..identity() }, "CPU features"),
            (Identity { version: "2".into(), ..identity() }, "wasmvisor version"),
        ] {
            let err = Snapshot::open(&path, &want, false).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        // One byte of RAM data changed: the checksum catches it (unless told it was verified).
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0x12], RAM_OFFSET + 0x4008).unwrap();
        let err = Snapshot::open(&path, &identity(), false).unwrap_err().to_string();
        assert!(err.contains("checksum does not verify"), "{err}");
        // A damaged header, a truncated file, a foreign file.
        file.write_all_at(&[0xff; 8], PREAMBLE as u64).unwrap();
        assert!(Snapshot::open(&path, &identity(), true).is_err());
        file.set_len(100).unwrap();
        assert!(Snapshot::open(&path, &identity(), true).is_err());
        std::fs::write(&path, b"not a snapshot at all, not even close to one........").unwrap();
        let err = Snapshot::open(&path, &identity(), true).unwrap_err().to_string();
        assert!(err.contains("bad magic"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
