//! CPU features as the guest sees them: the one detection both sides use.
//!
//! What a guest may run is what CPUID says *inside the guest*, which is not what the host
//! process sees: under PVM a CPL 3 guest executes CPUID natively on some hosts and gets a
//! filtered view on others (an Intel Xeon host hides LZCNT from it), and on VMX/SVM KVM answers
//! CPUID from the table the VMM set. So the host never decides from its own CPUID. The guest
//! reads a [`CpuidTable`] (the leaves below, and XCR0), [`detect`] turns it into a
//! [`FeatureSet`], and that set is both what the guest answers wasmtime's feature probe with
//! when it loads an artifact and what it reports to the host (a [`CpuReport`], by the
//! `CpuReport` hypercall in a feature-report boot) for the host to compile for.
//!
//! [`detect`] is a pure function over the table, so host tests feed it tables of real and
//! made-up CPUs. A [`FeatureSet`] is a bit set over [`Feature`]; bit `n` is the feature whose
//! discriminant is `n`, so a set crosses the VM boundary as one `u64`.

/// The (leaf, subleaf) pairs a [`CpuidTable`] holds, in order.
pub const CPUID_LEAVES: [(u32, u32); 6] = [(0, 0), (1, 0), (7, 0), (0xd, 0), (0x8000_0000, 0), (0x8000_0001, 0)];

/// Bumped whenever [`CpuidTable`], [`CpuReport`] or [`detect`] changes meaning.
pub const CPU_REPORT_VERSION: u32 = 1;

/// The CPUID leaves feature detection reads, as one CPU answered them, and XCR0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidTable {
    /// EAX, EBX, ECX, EDX of each of [`CPUID_LEAVES`]; zero for a leaf above the CPU's maximum.
    pub leaves: [[u32; 4]; CPUID_LEAVES.len()],
    /// XCR0, or 0 where CPUID says the OS has not enabled XSAVE (OSXSAVE clear).
    pub xcr0: u64,
}

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;

impl CpuidTable {
    /// Reads the table with `cpuid(leaf, subleaf)` and `xgetbv0()` (called only when CPUID
    /// reports OSXSAVE). Leaves above the maximum basic or extended leaf are left zero: CPUs
    /// answer those with other leaves' data.
    pub fn read(mut cpuid: impl FnMut(u32, u32) -> [u32; 4], xgetbv0: impl FnOnce() -> u64) -> Self {
        let mut table = Self::default();
        let max_basic = cpuid(0, 0)[EAX];
        let max_ext = cpuid(0x8000_0000, 0)[EAX];
        for (slot, &(leaf, sub)) in table.leaves.iter_mut().zip(CPUID_LEAVES.iter()) {
            let max = if leaf >= 0x8000_0000 { max_ext } else { max_basic };
            if leaf <= max {
                *slot = cpuid(leaf, sub);
            }
        }
        const OSXSAVE: u32 = 1 << 27;
        if table.leaf(1, 0)[ECX] & OSXSAVE != 0 {
            table.xcr0 = xgetbv0();
        }
        table
    }

    /// The registers of `(leaf, subleaf)`: zero when the table does not hold it, or when it is
    /// above the maximum leaf the table's leaf 0 (or 0x8000_0000) names, whatever was stored.
    pub fn leaf(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let Some(i) = CPUID_LEAVES.iter().position(|&l| l == (leaf, subleaf)) else { return [0; 4] };
        let max = if leaf >= 0x8000_0000 { self.leaves[4][EAX] } else { self.leaves[0][EAX] };
        if leaf > max { [0; 4] } else { self.leaves[i] }
    }

    /// The vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD"), if it is ASCII.
    pub fn vendor(&self) -> [u8; 12] {
        let [_, b, c, d] = self.leaves[0];
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&b.to_le_bytes());
        v[4..8].copy_from_slice(&d.to_le_bytes());
        v[8..].copy_from_slice(&c.to_le_bytes());
        v
    }
}

/// A CPU feature that compiled code may depend on, named as wasmtime's feature probe asks for
/// it (the names of Rust's `is_x86_feature_detected!`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// SSE3.
    Sse3 = 0,
    /// SSSE3.
    Ssse3 = 1,
    /// SSE4.1.
    Sse41 = 2,
    /// SSE4.2.
    Sse42 = 3,
    /// POPCNT.
    Popcnt = 4,
    /// CMPXCHG16B.
    Cmpxchg16b = 5,
    /// AVX (and its register state enabled in XCR0).
    Avx = 6,
    /// FMA3 (needs the AVX state).
    Fma = 7,
    /// AVX2 (needs the AVX state).
    Avx2 = 8,
    /// BMI1.
    Bmi1 = 9,
    /// BMI2.
    Bmi2 = 10,
    /// LZCNT (ABM).
    Lzcnt = 11,
    /// AVX-512 Foundation (and the AVX-512 state in XCR0).
    Avx512f = 12,
    /// AVX-512 DQ.
    Avx512dq = 13,
    /// AVX-512 VL.
    Avx512vl = 14,
    /// AVX-512 VBMI.
    Avx512vbmi = 15,
    /// AVX-512 VNNI.
    Avx512vnni = 16,
    /// AVX-512 BITALG.
    Avx512bitalg = 17,
}

impl Feature {
    /// Every feature, in discriminant order.
    pub const ALL: [Feature; 18] = [
        Self::Sse3,
        Self::Ssse3,
        Self::Sse41,
        Self::Sse42,
        Self::Popcnt,
        Self::Cmpxchg16b,
        Self::Avx,
        Self::Fma,
        Self::Avx2,
        Self::Bmi1,
        Self::Bmi2,
        Self::Lzcnt,
        Self::Avx512f,
        Self::Avx512dq,
        Self::Avx512vl,
        Self::Avx512vbmi,
        Self::Avx512vnni,
        Self::Avx512bitalg,
    ];

    /// The name wasmtime's probe uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sse3 => "sse3",
            Self::Ssse3 => "ssse3",
            Self::Sse41 => "sse4.1",
            Self::Sse42 => "sse4.2",
            Self::Popcnt => "popcnt",
            Self::Cmpxchg16b => "cmpxchg16b",
            Self::Avx => "avx",
            Self::Fma => "fma",
            Self::Avx2 => "avx2",
            Self::Bmi1 => "bmi1",
            Self::Bmi2 => "bmi2",
            Self::Lzcnt => "lzcnt",
            Self::Avx512f => "avx512f",
            Self::Avx512dq => "avx512dq",
            Self::Avx512vl => "avx512vl",
            Self::Avx512vbmi => "avx512vbmi",
            Self::Avx512vnni => "avx512vnni",
            Self::Avx512bitalg => "avx512bitalg",
        }
    }

    /// The feature wasmtime's probe means by `name`, if it is one of ours.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Where CPUID reports it: (leaf, register index EAX=0..EDX=3, bit).
    const fn cpuid_bit(self) -> (u32, usize, u32) {
        match self {
            Self::Sse3 => (1, ECX, 0),
            Self::Ssse3 => (1, ECX, 9),
            Self::Fma => (1, ECX, 12),
            Self::Cmpxchg16b => (1, ECX, 13),
            Self::Sse41 => (1, ECX, 19),
            Self::Sse42 => (1, ECX, 20),
            Self::Popcnt => (1, ECX, 23),
            Self::Avx => (1, ECX, 28),
            Self::Bmi1 => (7, EBX, 3),
            Self::Avx2 => (7, EBX, 5),
            Self::Bmi2 => (7, EBX, 8),
            Self::Avx512f => (7, EBX, 16),
            Self::Avx512dq => (7, EBX, 17),
            Self::Avx512vl => (7, EBX, 31),
            Self::Avx512vbmi => (7, ECX, 1),
            Self::Avx512vnni => (7, ECX, 11),
            Self::Avx512bitalg => (7, ECX, 12),
            Self::Lzcnt => (0x8000_0001, ECX, 5),
        }
    }

    /// The XCR0 bits its register state needs enabled.
    const fn xcr0_needed(self) -> u64 {
        const SSE_AVX: u64 = 0b110;
        const AVX512: u64 = 0b1110_0110;
        match self {
            Self::Avx | Self::Fma | Self::Avx2 => SSE_AVX,
            Self::Avx512f
            | Self::Avx512dq
            | Self::Avx512vl
            | Self::Avx512vbmi
            | Self::Avx512vnni
            | Self::Avx512bitalg => AVX512,
            _ => 0,
        }
    }
}

/// A set of [`Feature`]s: bit `n` is the feature with discriminant `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FeatureSet(pub u64);

impl FeatureSet {
    /// No features.
    pub const EMPTY: Self = Self(0);

    /// Whether `f` is in the set.
    pub const fn contains(self, f: Feature) -> bool {
        self.0 & (1 << f as u8) != 0
    }

    /// The set with `f` added.
    pub const fn with(self, f: Feature) -> Self {
        Self(self.0 | (1 << f as u8))
    }

    /// The set without anything in `other`.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// The features in the set, in discriminant order. Bits that name no feature are ignored.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.into_iter().filter(move |&f| self.contains(f))
    }

    /// Only the bits that name features (what a `u64` from elsewhere may claim beyond them is dropped).
    pub fn known(self) -> Self {
        Self(self.0 & ((1 << Feature::ALL.len()) - 1))
    }
}

/// The features the CPU that answered `table` has, with their register state enabled.
pub fn detect(table: &CpuidTable) -> FeatureSet {
    Feature::ALL.into_iter().filter(|&f| has(table, f)).fold(FeatureSet::EMPTY, FeatureSet::with)
}

/// Whether the CPU that answered `table` has `feature`, with its register state enabled.
pub fn has(table: &CpuidTable, feature: Feature) -> bool {
    let (leaf, reg, bit) = feature.cpuid_bit();
    let needed = feature.xcr0_needed();
    table.leaf(leaf, 0)[reg] & (1 << bit) != 0 && table.xcr0 & needed == needed
}

/// What the guest tells the host in a feature-report boot: the raw table, and the features
/// it detects, with those the VMM masked (`BootInfo::cpu_features_masked`) removed: exactly
/// what it will answer wasmtime's probe with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuReport {
    /// [`CPU_REPORT_VERSION`].
    pub version: u32,
    /// The guest's CPUID table.
    pub table: CpuidTable,
    /// The features the guest detects (bits of a [`FeatureSet`]).
    pub detected: FeatureSet,
}

/// Size of an encoded [`CpuReport`] in bytes: version, the leaves, XCR0, the set.
pub const CPU_REPORT_SIZE: usize = 4 + CPUID_LEAVES.len() * 16 + 8 + 8;

impl CpuReport {
    /// The little-endian encoding the guest writes to its memory.
    pub fn encode(&self) -> [u8; CPU_REPORT_SIZE] {
        let mut out = [0u8; CPU_REPORT_SIZE];
        out[..4].copy_from_slice(&self.version.to_le_bytes());
        let mut at = 4;
        for regs in &self.table.leaves {
            for r in regs {
                out[at..at + 4].copy_from_slice(&r.to_le_bytes());
                at += 4;
            }
        }
        out[at..at + 8].copy_from_slice(&self.table.xcr0.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&self.detected.0.to_le_bytes());
        out
    }

    /// Decodes what a guest wrote; `None` unless the version is [`CPU_REPORT_VERSION`]. Any
    /// other bit pattern decodes (the host treats the content as a claim, not a fact).
    pub fn decode(bytes: &[u8; CPU_REPORT_SIZE]) -> Option<Self> {
        let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        let version = u32_at(0);
        if version != CPU_REPORT_VERSION {
            return None;
        }
        let mut table = CpuidTable::default();
        let mut at = 4;
        for regs in &mut table.leaves {
            for r in regs.iter_mut() {
                *r = u32_at(at);
                at += 4;
            }
        }
        table.xcr0 = u64_at(at);
        let detected = FeatureSet(u64_at(at + 8)).known();
        Some(Self { version, table, detected })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table from (leaf → registers) pairs.
    fn table(entries: &[((u32, u32), [u32; 4])], xcr0: u64) -> CpuidTable {
        CpuidTable::read(
            |leaf, sub| entries.iter().find(|(l, _)| *l == (leaf, sub)).map_or([0; 4], |(_, r)| *r),
            || xcr0,
        )
    }

    fn names(set: FeatureSet) -> alloc::vec::Vec<&'static str> {
        set.iter().map(Feature::name).collect()
    }

    /// This project's dev machine, an AMD EPYC (family 0x19) under kvm_pvm, as its CPL 3 guest
    /// reported it (`wasmvisor cpu`, 2026-12-02): SSE3..AVX2, BMI, LZCNT; no AVX-512. Identical
    /// to the host process's view there but for the APIC ID in leaf 1 EBX.
    fn amd_epyc_pvm_guest() -> CpuidTable {
        table(
            &[
                ((0, 0), [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
                ((1, 0), [0x00a0_0f11, 0x0102_0800, 0xfffa_3203, 0x178b_fbff]),
                ((7, 0), [0, 0x219c_07ab, 0x0040_069c, 0x8800_0010]),
                ((0xd, 0), [0x207, 0x988, 0x988, 0]),
                ((0x8000_0000, 0), [0x8000_0022, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
                ((0x8000_0001, 0), [0x00a0_0f11, 0x4000_0000, 0x0040_03f3, 0x2fd3_fbff]),
            ],
            0x207,
        )
    }

    /// An Intel Xeon (Cascade Lake) host's native view, as the host process sees it: with
    /// AVX-512 and, in leaf 0x8000_0001 ECX = 0x121, LZCNT.
    fn intel_xeon_host() -> CpuidTable {
        table(
            &[
                ((0, 0), [0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
                ((1, 0), [0x0005_0657, 0x0000_0800, 0xfffa_3203, 0x0f8b_fbff]),
                ((7, 0), [0, 0xd19f_4fbb, 0x0000_0808, 0xa400_0400]),
                ((0xd, 0), [0x2e7, 0xa88, 0xa88, 0]),
                ((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]),
                ((0x8000_0001, 0), [0, 0, 0x121, 0x2c10_0800]),
            ],
            0xe7,
        )
    }

    /// The same Intel host as its CPL 3 PVM guest sees it: LZCNT hidden (ECX = 0x101).
    fn intel_xeon_pvm_guest() -> CpuidTable {
        let mut t = intel_xeon_host();
        t.leaves[5][ECX] = 0x101;
        t
    }

    /// A minimal x86-64 CPU: SSE2 only (no SSE3), no XSAVE.
    fn minimal() -> CpuidTable {
        table(
            &[
                ((0, 0), [0x1, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
                ((1, 0), [0x0000_0f41, 0, 0x0000_2000, 0x0789_fbff]),
                // Above the maximum basic leaf: must be ignored whatever it says.
                ((7, 0), [0, 0xffff_ffff, 0xffff_ffff, 0]),
                ((0x8000_0000, 0), [0x8000_0001, 0, 0, 0]),
                ((0x8000_0001, 0), [0, 0, 0, 0x2010_0800]),
            ],
            0x3,
        )
    }

    #[test]
    fn an_amd_guest_has_avx2_bmi_and_lzcnt_but_no_avx512() {
        let t = amd_epyc_pvm_guest();
        assert_eq!(&t.vendor(), b"AuthenticAMD");
        assert_eq!(
            names(detect(&t)),
            [
                "sse3",
                "ssse3",
                "sse4.1",
                "sse4.2",
                "popcnt",
                "cmpxchg16b",
                "avx",
                "fma",
                "avx2",
                "bmi1",
                "bmi2",
                "lzcnt"
            ]
        );
    }

    #[test]
    fn the_intel_pvm_guest_lacks_the_lzcnt_its_host_has() {
        let host = detect(&intel_xeon_host());
        let guest = detect(&intel_xeon_pvm_guest());
        assert!(host.contains(Feature::Lzcnt));
        assert!(!guest.contains(Feature::Lzcnt));
        assert_eq!(host.without(guest), FeatureSet::EMPTY.with(Feature::Lzcnt));
        for f in [Feature::Avx512f, Feature::Avx512dq, Feature::Avx512vl, Feature::Avx512vnni, Feature::Bmi2] {
            assert!(guest.contains(f), "{f:?}");
        }
        assert!(!guest.contains(Feature::Avx512vbmi));
    }

    #[test]
    fn a_minimal_cpu_has_nothing_beyond_sse2() {
        let t = minimal();
        assert_eq!(t.leaves[2], [0; 4], "leaf 7 is above the maximum and not read");
        assert_eq!(names(detect(&t)), ["cmpxchg16b"]);
        assert_eq!(detect(&CpuidTable::default()), FeatureSet::EMPTY);
    }

    #[test]
    fn avx_needs_its_register_state() {
        let mut t = amd_epyc_pvm_guest();
        assert!(has(&t, Feature::Avx2));
        t.xcr0 = 0x3; // the OS enabled only x87 + SSE
        for f in [Feature::Avx, Feature::Fma, Feature::Avx2] {
            assert!(!has(&t, f), "{f:?}");
        }
        assert!(has(&t, Feature::Bmi2) && has(&t, Feature::Lzcnt));
        let mut intel = intel_xeon_host();
        intel.xcr0 = 0x7; // AVX but not the AVX-512 state
        assert!(has(&intel, Feature::Avx2) && !has(&intel, Feature::Avx512f));
    }

    #[test]
    fn leaves_above_the_maximum_read_as_zero_even_if_stored() {
        let mut t = minimal();
        t.leaves[2] = [0, u32::MAX, u32::MAX, u32::MAX];
        assert_eq!(t.leaf(7, 0), [0; 4]);
        assert_eq!(t.leaf(0x4000_0000, 0), [0; 4], "a leaf the table does not hold");
        assert!(!has(&t, Feature::Avx2));
    }

    #[test]
    fn names_round_trip_and_sets_fit_a_word() {
        for (i, f) in Feature::ALL.into_iter().enumerate() {
            assert_eq!(f as usize, i);
            assert_eq!(Feature::from_name(f.name()), Some(f));
        }
        assert_eq!(Feature::from_name("sse4a"), None);
        let s = FeatureSet(u64::MAX).known();
        assert_eq!(s.iter().count(), Feature::ALL.len());
    }

    #[test]
    fn reports_round_trip_and_refuse_other_versions() {
        let report =
            CpuReport { version: CPU_REPORT_VERSION, table: intel_xeon_pvm_guest(), detected: FeatureSet(0x7ff) };
        let bytes = report.encode();
        assert_eq!(CpuReport::decode(&bytes), Some(report));
        let mut other = bytes;
        other[0] = 99;
        assert_eq!(CpuReport::decode(&other), None);
        let mut hostile = bytes;
        hostile[CPU_REPORT_SIZE - 8..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(CpuReport::decode(&hostile).unwrap().detected, FeatureSet(u64::MAX).known());
    }
}
