//! Byte sampling of allocations, as Go's and jemalloc's heap profiles do it: a Poisson process
//! over allocated bytes with a mean of N bytes between samples, so a call of `s` bytes is
//! sampled with probability `1 - exp(-s/N)` whatever came before it. The probe keeps, per CPU,
//! the bytes left until the next sample and refills it from an exponential draw made here in
//! integer fixed point (BPF has no floats).
//!
//! Go: `nextSample`/`fastexprand` in `runtime/malloc.go` (`MemProfileRate`, 512 KiB); the
//! user side scales what was sampled as pprof does (`scaleHeapSample`,
//! `agent/src/aggregate.rs`).

/// Largest sampling mean accepted (1 TiB): keeps [`draw`]'s products within 64 bits.
pub const MAX_MEAN: u64 = 1 << 40;

/// ln 2 in Q32 (round(0.693147180559945 × 2^32)).
const LN2_Q32: u64 = 2_977_044_472;

/// Fraction bits of the binary logarithm.
const LOG2_BITS: u32 = 16;

/// `-ln(u)` in Q32 for `u = (r + 1) / 2^32`, uniform on (0, 1] when `r` is a uniform 32-bit
/// value: an exponential variate with mean 1 (at most 32 ln 2 ≈ 22.2, for `r = 0`).
///
/// `log2(r + 1)` is its leading bit plus 16 fraction bits found by repeated squaring of the
/// normalized mantissa (each squaring yields one bit: no table, and the error is below
/// 2^-15 per draw).
#[inline(always)]
pub const fn neg_ln_q32(r: u32) -> u64 {
    let q = r as u64 + 1;
    // 0 ..= 32.
    let k = 63 - q.leading_zeros() as u64;
    // The mantissa in Q1.31: [2^31, 2^32).
    let mut x = if k <= 31 {
        q << (31 - k)
    } else {
        q >> (k - 31)
    };
    let mut frac = 0u64;
    let mut i = 0;
    while i < LOG2_BITS {
        // x < 2^32, so x² < 2^64; the square is in [2^31, 2^33) in Q1.31. Without a branch:
        // the verifier walks every path of a loop, 2^16 of them with one.
        x = (x * x) >> 31;
        let bit = x >> 32;
        x >>= bit;
        frac = (frac << 1) | bit;
        i += 1;
    }
    let log2_q16 = (k << LOG2_BITS) | frac;
    // -log2(u) = 32 - log2(q), in Q16: at most 2^21.
    let neg_log2_q16 = (32 << LOG2_BITS) - log2_q16;
    // Q16 × Q32 = Q48, < 2^53.
    (neg_log2_q16 * LN2_Q32) >> LOG2_BITS
}

/// The bytes until the next sample: an exponential draw with mean `mean` bytes from the
/// uniform 32-bit value `r`, at least 1 (as Go's `fastexprand`). `mean` must be at most
/// [`MAX_MEAN`].
#[inline(always)]
pub const fn draw(r: u32, mean: u64) -> u64 {
    let n = neg_ln_q32(r);
    // mean × n >> 32 without overflow: n < 2^37 is split at bit 16 (mean < 2^41).
    let hi = n >> 16;
    let lo = n & 0xffff;
    ((mean * hi) >> 16) + ((mean * lo) >> 32) + 1
}

/// Accounts a call of `size` bytes against `left`, the bytes left until the next sample
/// (0: none drawn yet), and says whether the call is sampled; `rand` yields uniform 32-bit
/// values (the probe: `bpf_get_prandom_u32`). A call of size 0 is never sampled.
#[inline(always)]
pub fn step(left: &mut u64, size: u64, mean: u64, mut rand: impl FnMut() -> u32) -> bool {
    if *left == 0 {
        *left = draw(rand(), mean);
    }
    if size < *left {
        *left -= size;
        return false;
    }
    // Memoryless: what is left of this interval is not carried over (as in Go).
    *left = draw(rand(), mean);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a deterministic stream, so the statistical tests below give the same
    /// answer at every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u32
        }
    }

    #[test]
    fn neg_ln_matches_float() {
        for r in [
            0u32,
            1,
            2,
            3,
            1000,
            1 << 20,
            1 << 31,
            3 << 30,
            u32::MAX - 1,
            u32::MAX,
        ] {
            let u = (f64::from(r) + 1.0) / 4_294_967_296.0;
            let want = -u.ln();
            let got = neg_ln_q32(r) as f64 / 4_294_967_296.0;
            assert!((got - want).abs() < 1e-4, "r {r}: {got} vs {want}");
        }
        assert_eq!(neg_ln_q32(u32::MAX), 0);
    }

    /// The mean over an even grid of every 4,096th 32-bit value is the integral itself: the
    /// fixed point's bias, free of sampling noise.
    #[test]
    fn draw_mean_over_a_grid() {
        for mean in [64u64, 512, 4096, 512 << 10, 1 << 30, MAX_MEAN] {
            let n = 1u64 << 20;
            let sum: u128 = (0..n)
                .map(|i| u128::from(draw((i << 12) as u32 + 2048, mean)))
                .sum();
            let got = sum as f64 / n as f64;
            // Whole bytes: the draw is truncated (-0.5 on average), then at least 1 (+1), as
            // Go's: its mean is N + 0.5.
            let want = mean as f64 + 0.5;
            assert!(
                (got - want).abs() / want < 0.002,
                "mean {mean}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn draw_mean_of_random_values() {
        let mut rng = Rng(7);
        let n = 1_000_000;
        let mean = 512 << 10;
        let sum: u64 = (0..n).map(|_| draw(rng.next(), mean)).sum();
        let got = sum as f64 / f64::from(n);
        // Standard error of the mean of an exponential: mean / sqrt(n) = 0.1 %.
        assert!((got / mean as f64 - 1.0).abs() < 0.01, "{got}");
    }

    /// The extremes: no overflow (debug builds check), the largest draw ≈ 22.2 × mean, the
    /// smallest 1.
    #[test]
    fn draw_edges() {
        let top = draw(0, MAX_MEAN);
        let want = 32.0 * std::f64::consts::LN_2 * MAX_MEAN as f64;
        assert!((top as f64 / want - 1.0).abs() < 1e-4, "{top}");
        assert_eq!(draw(u32::MAX, MAX_MEAN), 1);
        assert_eq!(draw(0, 0), 1);
        assert_eq!(
            draw(12345, 1),
            1 + (-((12346.0f64) / 4_294_967_296.0).ln()) as u64
        );
    }

    /// Calls of one size against the counter are sampled with probability 1 - exp(-s/N):
    /// within 5 standard deviations of the binomial (deterministic stream: never flakes).
    #[test]
    fn step_samples_with_poisson_probability() {
        let mean = 1024;
        let mut rng = Rng(42);
        for size in [0u64, 16, 256, 1024, 8192] {
            let mut left = 0;
            let n = 200_000u32;
            let hits = (0..n)
                .filter(|_| step(&mut left, size, mean, || rng.next()))
                .count() as f64;
            let p = 1.0 - (-(size as f64) / mean as f64).exp();
            let sd = (f64::from(n) * p * (1.0 - p)).sqrt();
            let want = f64::from(n) * p;
            assert!(
                (hits - want).abs() <= 5.0 * sd + 1.0,
                "size {size}: {hits} sampled, expected {want} ± {sd}"
            );
        }
    }

    /// Mixed sizes through one counter (the probe's per-CPU counter serves every process on
    /// the CPU): each size is still sampled with its own probability.
    #[test]
    fn step_is_memoryless_across_sizes() {
        let mean = 4096;
        let mut rng = Rng(3);
        let mut left = 0;
        let sizes = [24u64, 4000, 100_000];
        let mut hits = [0u32; 3];
        let n = 150_000;
        for i in 0..n {
            let k = i % 3;
            if step(&mut left, sizes[k], mean, || rng.next()) {
                hits[k] += 1;
            }
        }
        for (k, &s) in sizes.iter().enumerate() {
            let calls = (n / 3) as f64;
            let p = 1.0 - (-(s as f64) / mean as f64).exp();
            let sd = (calls * p * (1.0 - p)).sqrt();
            assert!(
                (f64::from(hits[k]) - calls * p).abs() <= 5.0 * sd + 1.0,
                "size {s}: {} vs {}",
                hits[k],
                calls * p
            );
        }
    }
}
