//! The CPU features the guest detects on this host: what components are compiled for.
//!
//! The host process's own CPUID is not the guest's (under PVM an Intel host hides LZCNT from
//! its CPL 3 guests; on VMX/SVM KVM answers CPUID from the table the VMM sets), so wasmvisor
//! asks the guest. A feature-report boot (`VmConfig::cpu_report`) runs the guest image only up
//! to the `CpuReport` hypercall: its raw CPUID table and the [`FeatureSet`] its detection
//! (`wasmvisor_abi::cpu::detect`, the very function that answers wasmtime's probe in the
//! guest) yields. The report is cached in the artifact cache directory, keyed by everything
//! that could change it: wasmvisor's version, the report format, the KVM flavor, the kernel
//! release, the host CPU's own CPUID table and microcode revision, the guest image, and the
//! features the VMM masks. So a host pays for the probe boot (a few ms) once, not per run.
//!
//! Defence in depth: when a guest still refuses an artifact for a Cranelift setting,
//! [`GuestCpu::refuse`] records the setting in the cached report, and no later compile on
//! this host uses it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmvisor_abi::cpu::{CPU_REPORT_VERSION, CPUID_LEAVES, CpuReport, CpuidTable, Feature, FeatureSet, detect};
use wasmvisor_engine::ISA_FEATURES;

use crate::console::SharedBuffer;
use crate::hypercall::GuestIo;
use crate::vm::{self, VmConfig, VmError};

/// First line of a cached report.
const FILE_MAGIC: &str = "wasmvisor-guest-cpu";
/// RAM of a feature-report boot: the smallest the VMM allows (nothing is touched anyway).
const PROBE_MEMORY_MIB: u64 = 8;
/// Time limit of a feature-report boot.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the guest's CPU features could not be learnt.
#[derive(Debug, thiserror::Error)]
pub enum GuestCpuError {
    /// The feature-report boot failed.
    #[error("cannot learn the guest's CPU features: the feature-report boot failed: {0}")]
    Probe(#[source] Box<VmError>),
    /// The guest ran but sent no (valid) report.
    #[error(
        "cannot learn the guest's CPU features: the guest image {guest} exited with {code} without a valid \
         feature report (is it a wasmvisor guest of this version?)"
    )]
    NoReport {
        /// The guest image.
        guest: PathBuf,
        /// Its exit code.
        code: u8,
    },
    /// The guest image's metadata (for the cache key) could not be read.
    #[error("cannot read the guest image {path}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The guest's CPU features on this host, and the Cranelift settings it refused anyway.
#[derive(Clone, Debug)]
pub struct GuestCpu {
    /// What the guest reported.
    pub report: CpuReport,
    /// Cranelift ISA flags a guest refused an artifact for although the report has their
    /// feature; never compiled for again on this host.
    pub refused: BTreeSet<&'static str>,
    /// Where the report is cached.
    pub path: PathBuf,
    /// Whether this call asked the guest (a feature-report boot) rather than the cache.
    pub probed: bool,
    /// How long finding the report took (the probe boot included, if any).
    pub elapsed: Duration,
    /// The cache key the file is stored under.
    key: String,
}

impl GuestCpu {
    /// The report for the VM `config` describes (its guest image, KVM device and feature
    /// mask), from the cache in `cache_dir`, or from a feature-report boot that is then cached.
    pub fn for_vm(cache_dir: &Path, config: &VmConfig) -> Result<Self, GuestCpuError> {
        Self::load(cache_dir, config, true)
    }

    /// Like [`Self::for_vm`], but always asks the guest again (and replaces the cached report,
    /// refusals included).
    pub fn refresh(cache_dir: &Path, config: &VmConfig) -> Result<Self, GuestCpuError> {
        Self::load(cache_dir, config, false)
    }

    fn load(cache_dir: &Path, config: &VmConfig, use_cache: bool) -> Result<Self, GuestCpuError> {
        let t = Instant::now();
        let key = cache_key(config)?;
        let path = cache_dir.join(format!("guest-cpu-{}.txt", &key[..32]));
        if use_cache
            && let Some(mut cpu) = std::fs::read_to_string(&path).ok().and_then(|text| parse(&text, &key, &path))
        {
            cpu.elapsed = t.elapsed();
            return Ok(cpu);
        }
        let report = probe(config)?;
        let cpu = Self { report, refused: BTreeSet::new(), path, probed: true, elapsed: t.elapsed(), key };
        // A cache that cannot be written costs the next run another probe, nothing more.
        if let Err(e) = cpu.store() {
            tracing::warn!(path = %cpu.path.display(), "cannot cache the guest's CPU features: {e}");
        }
        Ok(cpu)
    }

    /// The Cranelift ISA flags to compile with: those of `ISA_FEATURES` whose feature the
    /// guest detects, less the refused ones, in `ISA_FEATURES` order.
    pub fn isa_flags(&self) -> Vec<&'static str> {
        ISA_FEATURES
            .iter()
            .filter(|(flag, feature)| {
                Feature::from_name(feature).is_some_and(|f| self.report.detected.contains(f))
                    && !self.refused.contains(flag)
            })
            .map(|(flag, _)| *flag)
            .collect()
    }

    /// Records that a guest refused an artifact for `flag`; returns whether `flag` was one
    /// [`Self::isa_flags`] had (a name outside it changes nothing). The cached report is
    /// rewritten so that later runs on this host compile without it.
    pub fn refuse(&mut self, flag: &str) -> bool {
        let Some(&(known, _)) = ISA_FEATURES.iter().find(|(f, _)| *f == flag) else { return false };
        if !self.isa_flags().contains(&known) {
            return false;
        }
        self.refused.insert(known);
        if let Err(e) = self.store() {
            tracing::warn!(path = %self.path.display(), "cannot record the refused setting {flag}: {e}");
        }
        true
    }

    /// Writes the report to its cache file (a temporary file renamed into place).
    fn store(&self) -> std::io::Result<()> {
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".guest-cpu.{}.{n}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(render(&self.report, &self.refused, &self.key).as_bytes())?;
            file.sync_data()?;
            std::fs::rename(&tmp, &self.path)
        };
        let result = write();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Boots the guest image of `config` in feature-report mode and returns its report.
pub fn probe(config: &VmConfig) -> Result<CpuReport, GuestCpuError> {
    let probe = VmConfig {
        memory_mib: PROBE_MEMORY_MIB,
        guest: config.guest.clone(),
        timeout: PROBE_TIMEOUT,
        kvm_device: config.kvm_device.clone(),
        cpu_report: true,
        cpu_features_masked: config.cpu_features_masked,
        ..VmConfig::default()
    };
    let console = SharedBuffer::default();
    let io = GuestIo::captured(Box::new(console.clone()), Box::new(std::io::sink()), Box::new(std::io::sink()));
    let report = vm::boot(&probe, io).map_err(|e| GuestCpuError::Probe(Box::new(e)))?;
    match report.cpu_report {
        Some(r) if report.exit_code == 0 => Ok(r),
        _ => Err(GuestCpuError::NoReport { guest: config.guest.clone(), code: report.exit_code }),
    }
}

/// This host process's own CPUID table (never what the guest is compiled for: a key, and a
/// comparison for `wasmvisor cpu`).
pub fn host_table() -> CpuidTable {
    CpuidTable::read(
        |leaf, sub| {
            let r = std::arch::x86_64::__cpuid_count(leaf, sub);
            [r.eax, r.ebx, r.ecx, r.edx]
        },
        || {
            let (lo, hi): (u32, u32);
            // SAFETY: XGETBV with ECX=0 reads XCR0; `CpuidTable::read` calls this only when
            // CPUID reports OSXSAVE, i.e. when the kernel enabled it for user space.
            unsafe {
                std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack));
            }
            u64::from(lo) | (u64::from(hi) << 32)
        },
    )
}

/// The CPU's microcode revision as the kernel reports it, if it does: the first CPU's entry
/// of /proc/cpuinfo, which comes before its long `flags` line (one short read, not the file).
fn microcode() -> String {
    use std::io::Read;
    let mut head = [0u8; 2048];
    let n = std::fs::File::open("/proc/cpuinfo").and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    String::from_utf8_lossy(&head[..n])
        .lines()
        .find(|l| l.starts_with("microcode"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(String::new, |v| v.trim().to_owned())
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    // SAFETY: `utsname` is plain bytes; zeroed is a valid value for uname(2) to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes only into the struct we pass, which lives across the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let release: Vec<u8> = uts.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&release).into_owned()
}

/// Everything that could change what the guest detects, hashed.
fn cache_key(config: &VmConfig) -> Result<String, GuestCpuError> {
    use std::os::unix::fs::MetadataExt;
    let image = std::fs::metadata(&config.guest)
        .map_err(|source| GuestCpuError::Image { path: config.guest.clone(), source })?;
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update(s.as_bytes());
        h.update(b"\0");
    };
    field(env!("CARGO_PKG_VERSION"));
    field(&CPU_REPORT_VERSION.to_string());
    field(&vm::kvm_flavor().to_string());
    field(config.kvm_device.to_string_lossy().as_ref());
    field(&kernel_release());
    field(&microcode());
    // Leaf 1 EBX[31:24] is the APIC ID of whichever CPU this process runs on: not a property
    // of the host.
    let mut host = host_table();
    host.leaves[1][1] &= 0x00ff_ffff;
    field(&format!("{host:?}"));
    field(config.guest.to_string_lossy().as_ref());
    field(&format!(
        "{} {} {} {}",
        image.dev(),
        image.ino(),
        image.len(),
        image.mtime_nsec() + image.mtime() * 1_000_000_000
    ));
    field(&config.cpu_features_masked.0.to_string());
    Ok(crate::wasm::aot::hex(&h.finalize()))
}

/// The cache file's text: readable by an operator, parsed back by [`parse`].
fn render(report: &CpuReport, refused: &BTreeSet<&'static str>, key: &str) -> String {
    let mut s = format!("{FILE_MAGIC} {CPU_REPORT_VERSION}\nkey {key}\n");
    for (&(leaf, sub), regs) in CPUID_LEAVES.iter().zip(&report.table.leaves) {
        let _ = writeln!(s, "leaf {leaf:#x} {sub:#x} {:#x} {:#x} {:#x} {:#x}", regs[0], regs[1], regs[2], regs[3]);
    }
    let _ = writeln!(s, "xcr0 {:#x}", report.table.xcr0);
    let names: Vec<&str> = report.detected.iter().map(Feature::name).collect();
    let _ = writeln!(s, "detected {}", names.join(" "));
    let refused: Vec<&str> = refused.iter().copied().collect();
    let _ = writeln!(s, "refused {}", refused.join(" "));
    s
}

/// Parses a cache file written by [`render`] for `key`; `None` for anything else (another key,
/// another version, a damaged or hand-edited file), which makes the caller probe again.
fn parse(text: &str, key: &str, path: &Path) -> Option<GuestCpu> {
    let mut lines = text.lines();
    if lines.next()? != format!("{FILE_MAGIC} {CPU_REPORT_VERSION}") || lines.next()?.strip_prefix("key ")? != key {
        return None;
    }
    let num = |s: &str| -> Option<u64> { u64::from_str_radix(s.strip_prefix("0x")?, 16).ok() };
    let mut table = CpuidTable::default();
    for (&(leaf, sub), slot) in CPUID_LEAVES.iter().zip(table.leaves.iter_mut()) {
        let words: Vec<&str> = lines.next()?.split(' ').collect();
        let [tag, l, s, regs @ ..] = words.as_slice() else { return None };
        if *tag != "leaf" || num(l)? != u64::from(leaf) || num(s)? != u64::from(sub) || regs.len() != 4 {
            return None;
        }
        for (r, w) in slot.iter_mut().zip(regs) {
            *r = u32::try_from(num(w)?).ok()?;
        }
    }
    table.xcr0 = num(lines.next()?.strip_prefix("xcr0 ")?)?;
    let mut detected = FeatureSet::EMPTY;
    for name in lines.next()?.strip_prefix("detected")?.split_whitespace() {
        detected = detected.with(Feature::from_name(name)?);
    }
    let mut refused = BTreeSet::new();
    for name in lines.next()?.strip_prefix("refused")?.split_whitespace() {
        refused.insert(ISA_FEATURES.iter().find(|(f, _)| *f == name)?.0);
    }
    if lines.next().is_some() {
        return None;
    }
    let report = CpuReport { version: CPU_REPORT_VERSION, table, detected };
    Some(GuestCpu {
        report,
        refused,
        path: path.to_owned(),
        probed: false,
        elapsed: Duration::ZERO,
        key: key.to_owned(),
    })
}

/// Leaf-by-leaf differences between the host process's CPUID and the guest's, and the
/// features each detects, for `wasmvisor cpu`.
pub fn describe(host: &CpuidTable, guest: &GuestCpu) -> String {
    let mut s = String::new();
    let vendor = String::from_utf8_lossy(&guest.report.table.vendor()).into_owned();
    let _ = writeln!(s, "guest CPU: {vendor}, XCR0 {:#x} (host process: {:#x})", guest.report.table.xcr0, host.xcr0);
    let _ = writeln!(s, "{:<22} {:<44} host process, where it differs", "CPUID leaf", "guest EAX EBX ECX EDX");
    for (i, &(leaf, sub)) in CPUID_LEAVES.iter().enumerate() {
        let g = guest.report.table.leaves[i];
        let h = host.leaves[i];
        let regs = |r: [u32; 4]| format!("{:08x} {:08x} {:08x} {:08x}", r[0], r[1], r[2], r[3]);
        let differs = if g == h { String::new() } else { regs(h) };
        let _ = writeln!(s, "{:<22} {:<44} {differs}", format!("{leaf:#010x}.{sub}"), regs(g));
    }
    let host_set = detect(host);
    let names = |set: FeatureSet| set.iter().map(Feature::name).collect::<Vec<_>>().join(" ");
    let _ = writeln!(s, "guest detects:  {}", names(guest.report.detected));
    let hidden = host_set.without(guest.report.detected);
    if hidden != FeatureSet::EMPTY {
        let _ = writeln!(s, "host only:      {} (never compiled for)", names(hidden));
    }
    let extra = guest.report.detected.without(host_set);
    if extra != FeatureSet::EMPTY {
        let _ = writeln!(s, "guest only:     {}", names(extra));
    }
    let _ = writeln!(s, "compile flags:  {}", guest.isa_flags().join(" "));
    if !guest.refused.is_empty() {
        let refused: Vec<&str> = guest.refused.iter().copied().collect();
        let _ = writeln!(s, "refused:        {} (a guest rejected artifacts built with them)", refused.join(" "));
    }
    let _ = write!(s, "cached in:      {}", guest.path.display());
    s
}

/// The Cranelift setting a guest's artifact rejection names, if it is a CPU setting:
/// wasmtime says `compilation setting "has_lzcnt" is enabled, but not available on the host`,
/// or `failed to detect ... (compile setting "has_x")`.
pub fn refused_setting(why: &str) -> Option<&str> {
    for marker in ["compilation setting \"", "compile setting \""] {
        if let Some(i) = why.find(marker) {
            let rest = &why[i + marker.len()..];
            let name = &rest[..rest.find('"')?];
            if ISA_FEATURES.iter().any(|(f, _)| *f == name) {
                return Some(name);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestCpu {
        let table = host_table();
        let report = CpuReport { version: CPU_REPORT_VERSION, table, detected: detect(&table) };
        let path = PathBuf::from("/nonexistent/guest-cpu.txt");
        GuestCpu { report, refused: BTreeSet::new(), path, probed: false, elapsed: Duration::ZERO, key: "k1".into() }
    }

    #[test]
    fn the_cache_file_round_trips_and_refuses_anything_else() {
        let mut cpu = sample();
        cpu.report.detected = FeatureSet::EMPTY.with(Feature::Sse3).with(Feature::Lzcnt).with(Feature::Avx512vl);
        cpu.refused.insert("has_lzcnt");
        let text = render(&cpu.report, &cpu.refused, "k1");
        let back = parse(&text, "k1", &cpu.path).expect("parses");
        assert_eq!(back.report, cpu.report);
        assert_eq!(back.refused, cpu.refused);
        assert_eq!(back.isa_flags(), ["has_sse3"]);
        assert!(parse(&text, "k2", &cpu.path).is_none(), "another key");
        assert!(parse(&text.replace("sse3", "sse9"), "k1", &cpu.path).is_none(), "an unknown feature");
        assert!(parse(&text.replace("has_lzcnt", "has_nothing"), "k1", &cpu.path).is_none());
        assert!(parse(&text[..text.len() / 2], "k1", &cpu.path).is_none(), "a truncated file");
        assert!(parse(&format!("{text}extra\n"), "k1", &cpu.path).is_none());
        assert!(parse(&text.replace("leaf 0x1 ", "leaf 0x2 "), "k1", &cpu.path).is_none());
        assert!(parse("", "k1", &cpu.path).is_none());
    }

    #[test]
    fn flags_follow_the_report_not_the_host() {
        let mut cpu = sample();
        cpu.report.detected = FeatureSet::EMPTY;
        assert!(cpu.isa_flags().is_empty(), "a guest without features gets the baseline");
        cpu.report.detected = FeatureSet::EMPTY.with(Feature::Bmi2).with(Feature::Sse41);
        assert_eq!(cpu.isa_flags(), ["has_sse41", "has_bmi2"]);
        assert!(cpu.refuse("has_bmi2"));
        assert!(!cpu.refuse("has_bmi2"), "already refused");
        assert!(!cpu.refuse("has_avx"), "not compiled for anyway");
        assert!(!cpu.refuse("opt_level"), "not an ISA flag");
        assert_eq!(cpu.isa_flags(), ["has_sse41"]);
    }

    #[test]
    fn rejections_name_their_setting() {
        let why = "compilation settings of module incompatible with native host: compilation setting \
                   \"has_lzcnt\" is enabled, but not available on the host";
        assert_eq!(refused_setting(why), Some("has_lzcnt"));
        let why =
            "failed to detect if target-specific flag \"avx2\" is available at runtime (compile setting \"has_avx2\")";
        assert_eq!(refused_setting(why), Some("has_avx2"));
        assert_eq!(refused_setting("compilation setting \"opt_level\" is different"), None);
        assert_eq!(refused_setting("Module was compiled with a different version"), None);
        assert_eq!(refused_setting("compilation setting \"has_lzcnt"), None, "unterminated");
    }
}
