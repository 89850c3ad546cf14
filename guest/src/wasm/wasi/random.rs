//! `wasi:random`: a ChaCha20 CSPRNG seeded from the VMM's seed mixed with RDSEED (where the
//! CPU has it), so that neither source alone decides the stream; a fast non-cryptographic
//! generator for `insecure`; a fixed per-instance `insecure-seed`.

use alloc::vec;
use alloc::vec::Vec;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::Ctx;
use super::wasi::random::{insecure, insecure_seed, random};

/// Largest single request for random bytes; beyond it the call traps.
const MAX_RANDOM_BYTES: u64 = 64 << 20;

/// The guest's random sources.
pub struct Rng {
    secure: ChaCha20Rng,
    insecure: u64,
}

/// 64 bits from RDSEED, if the CPU has it and it delivers within a few tries.
fn rdseed() -> Option<u64> {
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.ebx & (1 << 18) == 0 {
        return None;
    }
    for _ in 0..16 {
        let (value, ok): (u64, u8);
        // SAFETY: RDSEED is present (CPUID.7.0:EBX[18]) and runs at CPL 3.
        unsafe {
            core::arch::asm!("rdseed {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack))
        };
        if ok == 1 {
            return Some(value);
        }
    }
    None
}

impl Rng {
    /// Seeds from the VMM's 32 bytes, mixed with RDSEED output where available.
    pub fn new(boot_seed: [u8; 32]) -> Self {
        let mut seed = boot_seed;
        for chunk in seed.chunks_mut(8) {
            if let Some(hw) = rdseed() {
                for (s, h) in chunk.iter_mut().zip(hw.to_le_bytes()) {
                    *s ^= h;
                }
            }
        }
        let mut secure = ChaCha20Rng::from_seed(seed);
        let insecure = secure.next_u64() | 1;
        Self { secure, insecure }
    }

    /// A generator of its own, seeded from this one's secure stream (one per HTTP request's
    /// instance, so that no two instances share a stream).
    pub fn fork(&mut self) -> Self {
        let mut seed = [0u8; 32];
        self.secure.fill_bytes(&mut seed);
        let mut secure = ChaCha20Rng::from_seed(seed);
        let insecure = secure.next_u64() | 1;
        Self { secure, insecure }
    }

    /// Cryptographically secure bytes.
    pub fn bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            wasmtime::bail!("wasi:random request of {len} bytes exceeds {MAX_RANDOM_BYTES}");
        }
        let mut out = vec![0u8; len as usize];
        self.secure.fill_bytes(&mut out);
        Ok(out)
    }

    /// A secure u64.
    pub fn u64(&mut self) -> u64 {
        self.secure.next_u64()
    }

    /// A fast, non-cryptographic u64 (xorshift64*).
    pub fn insecure_u64(&mut self) -> u64 {
        let mut x = self.insecure;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.insecure = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl random::Host for Ctx {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.rng.bytes(len)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.rng.u64())
    }
}

impl insecure::Host for Ctx {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        if len > MAX_RANDOM_BYTES {
            wasmtime::bail!("wasi:random request of {len} bytes exceeds {MAX_RANDOM_BYTES}");
        }
        let mut out = Vec::with_capacity(len as usize);
        while out.len() < len as usize {
            let word = self.rng.insecure_u64().to_le_bytes();
            let take = (len as usize - out.len()).min(8);
            out.extend_from_slice(&word[..take]);
        }
        Ok(out)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.rng.insecure_u64())
    }
}

impl insecure_seed::Host for Ctx {
    fn insecure_seed(&mut self) -> wasmtime::Result<(u64, u64)> {
        Ok(self.insecure_seed)
    }
}
