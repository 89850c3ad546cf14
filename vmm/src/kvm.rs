//! Access to `/dev/kvm`: opening it with an actionable error, and telling which KVM it is.
//!
//! The flavor matters for every figure we report: PVM (`kvm_pvm`) emulates CPL 0 guest code
//! and pays ~25 us per exit, while VMX/SVM hosts are an order of magnitude faster.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

/// Default path of the KVM device.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Environment variable that overrides [`DEFAULT_KVM_DEVICE`] (used by tests).
pub const KVM_DEVICE_ENV: &str = "WASMVISOR_KVM_DEVICE";

/// Why `/dev/kvm` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "{path} does not exist: this host has no KVM. Run wasmvisor on a Linux host with \
         hardware virtualization (or PVM) and load the module (e.g. `modprobe kvm_intel`, \
         `modprobe kvm_amd` or `modprobe kvm_pvm`)"
    )]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// The device exists but may not be opened.
    #[error(
        "permission denied opening {path}: add this user to the group that owns it \
         (usually `kvm`: `sudo usermod -aG kvm $USER`, then log in again) or run as root"
    )]
    PermissionDenied {
        /// The path tried.
        path: PathBuf,
    },
    /// Opening failed for another reason, or the file is not a KVM device.
    #[error("cannot use {path} as the KVM device: {source}")]
    Unusable {
        /// The path tried.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The KVM API version is not the stable one (12).
    #[error("{path} speaks KVM API version {version}, wasmvisor needs 12")]
    ApiVersion {
        /// The path tried.
        path: PathBuf,
        /// What it reported.
        version: i32,
    },
}

/// Which KVM implementation serves the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// `kvm_pvm`: Pagetable-based Virtual Machine, no VMX/SVM, shadow paging.
    Pvm,
    /// `kvm_intel`: Intel VMX.
    Intel,
    /// `kvm_amd`: AMD SVM.
    Amd,
    /// None of the modules above is loaded (built-in KVM or another implementation).
    Unknown,
}

impl KvmFlavor {
    /// Detects the flavor from the loaded kernel modules.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(modules: &Path) -> Self {
        [("kvm_pvm", Self::Pvm), ("kvm_intel", Self::Intel), ("kvm_amd", Self::Amd)]
            .into_iter()
            .find(|(name, _)| modules.join(name).exists())
            .map_or(Self::Unknown, |(_, flavor)| flavor)
    }

    /// The kernel module's name.
    pub fn module(self) -> &'static str {
        match self {
            Self::Pvm => "kvm_pvm",
            Self::Intel => "kvm_intel",
            Self::Amd => "kvm_amd",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for KvmFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Self::Pvm => "kvm_pvm (PVM: no VMX/SVM, shadow paging)",
            Self::Intel => "kvm_intel (VMX)",
            Self::Amd => "kvm_amd (SVM)",
            Self::Unknown => "unknown KVM module",
        };
        f.write_str(what)
    }
}

/// The KVM device path to use: `$WASMVISOR_KVM_DEVICE` or `/dev/kvm`.
pub fn device_path() -> PathBuf {
    std::env::var_os(KVM_DEVICE_ENV).map_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE), PathBuf::from)
}

/// Takes an open KVM device (`path` names it in errors) and checks its API version.
pub fn from_file(path: &Path, file: std::fs::File) -> Result<Kvm, KvmError> {
    use std::os::fd::IntoRawFd;
    // SAFETY: the descriptor is open and owned by `file`, whose ownership passes to `Kvm`.
    let kvm = unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(file.into_raw_fd()) };
    check_api(path, kvm)
}

fn check_api(path: &Path, kvm: Kvm) -> Result<Kvm, KvmError> {
    // KVM_GET_API_VERSION on something that is not /dev/kvm fails (ENOTTY) and reads as -1.
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v if v < 0 => Err(KvmError::Unusable {
            path: path.to_owned(),
            source: std::io::Error::other("not a KVM device (KVM_GET_API_VERSION failed)"),
        }),
        version => Err(KvmError::ApiVersion { path: path.to_owned(), version }),
    }
}

/// Opens the KVM device at `path` and checks its API version.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::Unusable {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
        let source = std::io::Error::from_raw_os_error(e.errno());
        match source.kind() {
            std::io::ErrorKind::NotFound => KvmError::Missing { path: path.to_owned() },
            std::io::ErrorKind::PermissionDenied => KvmError::PermissionDenied { path: path.to_owned() },
            _ => KvmError::Unusable { path: path.to_owned(), source },
        }
    })?;
    check_api(path, kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_from_modules() {
        let dir = std::env::temp_dir().join(format!("wasmvisor-flavor-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(KvmFlavor::detect_in(&dir), KvmFlavor::Amd);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavor::detect_in(&dir), KvmFlavor::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(KvmFlavor::detect_in(&dir), KvmFlavor::Unknown);
    }

    #[test]
    fn missing_and_bogus_devices_are_named() {
        let err = open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/kvm does not exist"));
        let err = open(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("not a KVM device"), "{err}");
    }
}

/// KVM's own exit counters for one vCPU (`KVM_GET_STATS_FD`, Linux 5.14+), which also count the
/// exits KVM completes in the kernel (ioeventfd notifications) that the VMM never sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmExitStats {
    /// All exits from the guest.
    pub exits: u64,
    /// MMIO exits (including those an ioeventfd completed in the kernel).
    pub mmio_exits: u64,
    /// Port I/O exits (hypercalls, UART).
    pub io_exits: u64,
}

/// A vCPU's binary statistics file.
pub struct VcpuStats {
    file: std::fs::File,
    /// (name, byte offset into the data block) of the counters we read.
    offsets: Vec<(String, u64)>,
    data_offset: u64,
}

impl VcpuStats {
    /// Opens the statistics of `vcpu`; `None` where the kernel has no binary stats.
    pub fn open(vcpu: &kvm_ioctls::VcpuFd) -> Option<Self> {
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::os::unix::fs::FileExt;
        // _IO(KVMIO, 0xce)
        const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0).ok()?;
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let (name_size, num_desc) = (u32_at(&header, 4) as usize, u32_at(&header, 8) as usize);
        let (desc_offset, data_offset) = (u64::from(u32_at(&header, 16)), u64::from(u32_at(&header, 20)));
        // Each descriptor: flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
        let desc_size = 16 + name_size;
        let mut descs = vec![0u8; desc_size * num_desc];
        file.read_exact_at(&mut descs, desc_offset).ok()?;
        let mut offsets = Vec::new();
        for d in descs.chunks_exact(desc_size) {
            let name_bytes = &d[16..];
            let name = String::from_utf8_lossy(&name_bytes[..name_bytes.iter().position(|&b| b == 0).unwrap_or(0)]);
            if matches!(name.as_ref(), "exits" | "mmio_exits" | "io_exits") {
                offsets.push((name.into_owned(), u64::from(u32_at(d, 8))));
            }
        }
        Some(Self { file, offsets, data_offset })
    }

    /// The counters now.
    pub fn read(&self) -> KvmExitStats {
        use std::os::unix::fs::FileExt;
        let mut stats = KvmExitStats::default();
        for (name, offset) in &self.offsets {
            let mut b = [0u8; 8];
            if self.file.read_exact_at(&mut b, self.data_offset + offset).is_err() {
                continue;
            }
            let v = u64::from_le_bytes(b);
            match name.as_str() {
                "exits" => stats.exits = v,
                "mmio_exits" => stats.mmio_exits = v,
                _ => stats.io_exits = v,
            }
        }
        stats
    }
}
