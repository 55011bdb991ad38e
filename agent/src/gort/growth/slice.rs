//! Slice growth: `growslice`'s capacity rule per Go version, and the Go ≥ 1.26 moves of
//! append-built slices from their stack buffer to the heap.

use super::size_class::roundupsize;
use super::{
    GoVersion, GrowthError, HeapBytes, MAX_ALLOC, PTR_SIZE, SliceGrowth, TypeInfo, check_supported,
    minor,
};

/// Go's growth rule (`nextslicecap` since 1.20, inline before), in Go's `int` arithmetic.
pub(super) fn next_cap(old_cap: i64, new_len: i64, v: &GoVersion) -> i64 {
    let doublecap = old_cap.wrapping_add(old_cap);
    if new_len > doublecap {
        return new_len;
    }
    // Go 1.18 replaced "double below 1024, then +25%" with a smooth transition from 256.
    let smooth = minor(v) >= (1, 18);
    let threshold = if smooth { 256 } else { 1024 };
    if old_cap < threshold {
        return doublecap;
    }
    let mut newcap = old_cap;
    // `0 < newcap` stops the loop when the addition overflows, as Go's does.
    while 0 < newcap && newcap < new_len {
        let step = if smooth {
            newcap.wrapping_add(3 * threshold) / 4
        } else {
            newcap / 4
        };
        newcap = newcap.wrapping_add(step);
    }
    if newcap <= 0 { new_len } else { newcap }
}

pub(super) fn to_int(what: &'static str, value: u64) -> Result<i64, GrowthError> {
    i64::try_from(value).map_err(|_| GrowthError::BadInput {
        what,
        detail: format!("{value} is negative as a Go int"),
    })
}

/// `growslice`: the new capacity and the new backing array for an append that needs
/// `new_len` elements in a slice of capacity `old_cap` (entry arguments: `newLen`, `oldCap`,
/// `et` — before Go 1.20 `cap`, `old.cap`, `et`). Zero-sized elements allocate nothing and
/// get capacity `new_len`.
pub fn growslice(
    old_cap: u64,
    new_len: u64,
    elem: TypeInfo,
    v: &GoVersion,
) -> Result<SliceGrowth, GrowthError> {
    check_supported(v)?;
    if new_len <= old_cap {
        return Err(GrowthError::BadInput {
            what: "growslice",
            detail: format!("new length {new_len} fits the old capacity {old_cap}"),
        });
    }
    let new_len_int = to_int("growslice new length", new_len)?;
    let old_cap_int = to_int("growslice old capacity", old_cap)?;
    if elem.size == 0 {
        return Ok(SliceGrowth {
            old_cap,
            new_cap: new_len,
            heap: HeapBytes::default(),
        });
    }
    let too_large = GrowthError::TooLarge {
        what: "growslice",
        bytes_hint: new_len.saturating_mul(elem.size),
    };
    // Positive: next_cap returns new_len or a value that grew from old_cap towards it.
    let newcap = u64::try_from(next_cap(old_cap_int, new_len_int, v)).map_err(|_| {
        GrowthError::BadInput {
            what: "growslice",
            detail: "negative capacity".to_owned(),
        }
    })?;
    let noscan = !elem.has_pointers;
    let recompute = minor(v) >= (1, 20);
    // The size special cases of growslice: they differ in whether `capmem` is recomputed
    // from the rounded capacity, which changes the size mallocgc is asked for.
    let (capmem, new_cap) = if elem.size == 1 {
        if newcap > MAX_ALLOC {
            return Err(too_large);
        }
        let capmem = roundupsize(newcap, noscan, v);
        (capmem, capmem)
    } else if elem.size == PTR_SIZE {
        if newcap > MAX_ALLOC / PTR_SIZE {
            return Err(too_large);
        }
        let capmem = roundupsize(newcap * PTR_SIZE, noscan, v);
        (capmem, capmem / PTR_SIZE)
    } else if elem.size.is_power_of_two() {
        let shift = elem.size.trailing_zeros();
        if newcap > (MAX_ALLOC >> shift) {
            return Err(too_large);
        }
        let capmem = roundupsize(newcap << shift, noscan, v);
        let new_cap = capmem >> shift;
        (if recompute { new_cap << shift } else { capmem }, new_cap)
    } else {
        let bytes = elem.size.checked_mul(newcap).ok_or(too_large.clone())?;
        let capmem = roundupsize(bytes, noscan, v);
        let new_cap = capmem / elem.size;
        (
            if recompute {
                new_cap * elem.size
            } else {
                capmem
            },
            new_cap,
        )
    };
    if capmem > MAX_ALLOC {
        return Err(too_large);
    }
    Ok(SliceGrowth {
        old_cap,
        new_cap,
        heap: HeapBytes::one(capmem, elem.has_pointers, v),
    })
}

/// Go ≥ 1.26 `growsliceBuf` while the slice still fits the compiler's stack buffer
/// (`new_len <= bufLen`): the capacity it gives, `roundupsize(newLen*size)/size`. No heap
/// allocation; past the buffer growsliceBuf calls [`growslice`].
pub fn growslice_buf_cap(new_len: u64, elem: TypeInfo, v: &GoVersion) -> Result<u64, GrowthError> {
    check_supported(v)?;
    if minor(v) < (1, 26) {
        return Err(GrowthError::NotInVersion {
            version: v.raw.clone(),
            what: "growsliceBuf",
            since: "1.26",
        });
    }
    if elem.size == 0 {
        return Ok(new_len);
    }
    let bytes = new_len
        .checked_mul(elem.size)
        .filter(|&b| b <= MAX_ALLOC)
        .ok_or(GrowthError::TooLarge {
            what: "growsliceBuf",
            bytes_hint: new_len.saturating_mul(elem.size),
        })?;
    Ok(roundupsize(bytes, !elem.has_pointers, v) / elem.size)
}

/// Go ≥ 1.26 `moveSlice*`: a slice built in a stack buffer moves to the heap where it
/// escapes. `cap: Some(c)` for `moveSlice`/`moveSliceNoScan` (the capacity is kept), `None`
/// for the `NoCap` variants (capacity rounded up from the length to a size class). The
/// compiler picks the `NoScan` variants for element types without pointers.
pub fn move_slice(
    len: u64,
    cap: Option<u64>,
    elem: TypeInfo,
    v: &GoVersion,
) -> Result<SliceGrowth, GrowthError> {
    check_supported(v)?;
    if minor(v) < (1, 26) {
        return Err(GrowthError::NotInVersion {
            version: v.raw.clone(),
            what: "moveSlice",
            since: "1.26",
        });
    }
    let empty = SliceGrowth {
        old_cap: 0,
        new_cap: 0,
        heap: HeapBytes::default(),
    };
    let too_large = |n: u64| GrowthError::TooLarge {
        what: "moveSlice",
        bytes_hint: n.saturating_mul(elem.size),
    };
    let bytes_of = |n: u64| {
        n.checked_mul(elem.size)
            .filter(|&b| b <= MAX_ALLOC)
            .ok_or_else(|| too_large(n))
    };
    match cap {
        // Every variant returns at once, allocating nothing, for an empty slice.
        Some(0) => Ok(empty),
        None if len == 0 => Ok(empty),
        Some(c) => Ok(SliceGrowth {
            old_cap: c,
            new_cap: c,
            heap: HeapBytes::one(bytes_of(c)?, elem.has_pointers, v),
        }),
        None if elem.size == 0 => Ok(SliceGrowth {
            old_cap: len,
            new_cap: len,
            heap: HeapBytes::default(),
        }),
        None => {
            let capmem = roundupsize(bytes_of(len)?, !elem.has_pointers, v);
            let new_cap = capmem / elem.size;
            // moveSliceNoCap asks mallocgc for cap*size, moveSliceNoCapNoScan for capmem.
            let requested = if elem.has_pointers {
                new_cap * elem.size
            } else {
                capmem
            };
            Ok(SliceGrowth {
                old_cap: len,
                new_cap,
                heap: HeapBytes::one(requested, elem.has_pointers, v),
            })
        }
    }
}
