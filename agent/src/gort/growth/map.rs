//! Map growth: old bucket maps (`hashGrow`, doubling or same-size) and swiss maps (first group,
//! small map to table, table doubling, split, directory growth).

use allocwatch_common::go::GoRole;

use super::size_class::roundupsize;

use super::{
    GoVersion, GrowthError, HashGrow, HeapBytes, MAX_ALLOC, MapGrowKind, MapImpl, PTR_SIZE,
    SwissGrowth, TypeInfo, check_supported, versions,
};

// Swiss maps (internal/runtime/maps go1.25.5, go1.27.3).
pub(super) const GROUP_SLOTS: u64 = 8;
pub(super) const MAX_TABLE_CAPACITY: u64 = 1024;
/// `table` struct: used, capacity, growthLeft u16, localDepth u8, index int @8, groups
/// {data ptr @16, lengthMask @24}: 32 bytes, with a pointer.
pub(super) const TABLE_STRUCT_SIZE: u64 = 32;

pub(super) fn require_maps(v: &GoVersion, wanted: MapImpl) -> Result<(), GrowthError> {
    check_supported(v)?;
    let has = versions::map_impl(v);
    if has == wanted {
        Ok(())
    } else {
        Err(GrowthError::WrongMaps {
            version: v.raw.clone(),
            has,
            wanted,
        })
    }
}

/// `newarray(typ, n)` as one allocation.
pub(super) fn array_bytes(
    what: &'static str,
    n: u64,
    elem: TypeInfo,
    v: &GoVersion,
) -> Result<HeapBytes, GrowthError> {
    let size =
        n.checked_mul(elem.size)
            .filter(|&b| b <= MAX_ALLOC)
            .ok_or(GrowthError::TooLarge {
                what,
                bytes_hint: n.saturating_mul(elem.size),
            })?;
    Ok(HeapBytes::one(size, elem.has_pointers, v))
}

/// Old maps: `hashGrow(t, h)` seen at entry with `h.count` = `count` and `h.B` = `b` (not yet
/// changed), for buckets of `bucket` (`t.bucketsize`, and whether `t.bucket` has pointers).
/// The new bucket array is what `makeBucketArray(t, newB)` allocates: `2^newB` buckets, plus
/// for newB ≥ 4 `2^(newB-4)` preallocated overflow buckets, that count then stretched to
/// fill the size class (`roundupsize(n*bucketsize)/bucketsize`); `heap.requested` is
/// `buckets × bucketsize`. Doubling vs same-size is decided as hashGrow does, by
/// `overLoadFactor(count+1, B)` with that version's load factor.
pub fn hash_grow(
    count: u64,
    b: u8,
    bucket: TypeInfo,
    v: &GoVersion,
) -> Result<HashGrow, GrowthError> {
    require_maps(v, MapImpl::Buckets)?;
    let row = versions::lookup(v)?
        .funcs
        .into_iter()
        .find(|f| f.role == GoRole::MapHashGrow);
    // require_maps passed, so the row exists; stay panic-free anyway.
    let doubles =
        row.and_then(|f| f.hash_grow_doubles(count, b))
            .ok_or(GrowthError::WrongMaps {
                version: v.raw.clone(),
                has: versions::map_impl(v),
                wanted: MapImpl::Buckets,
            })?;
    let (kind, new_b) = if doubles {
        (MapGrowKind::Double, b.checked_add(1))
    } else {
        (MapGrowKind::SameSize, Some(b))
    };
    let too_large = GrowthError::TooLarge {
        what: "hashGrow",
        bytes_hint: u64::MAX,
    };
    let new_b = new_b.filter(|&nb| nb < 48).ok_or(too_large.clone())?;
    if bucket.size == 0 {
        return Err(GrowthError::BadInput {
            what: "hashGrow",
            detail: "bucket size 0".to_owned(),
        });
    }
    let base = 1u64 << new_b;
    let mut buckets = base;
    if new_b >= 4 {
        buckets += 1u64 << (new_b - 4);
        let size = bucket.size.checked_mul(buckets).ok_or(too_large)?;
        let up = roundupsize(size, !bucket.has_pointers, v);
        if up != size {
            buckets = up / bucket.size;
        }
    }
    Ok(HashGrow {
        kind,
        old_b: b,
        new_b,
        buckets,
        overflow_buckets: buckets - base,
        heap: array_bytes("hashGrow", buckets, bucket, v)?,
    })
}

/// The `table` struct every `newTable` allocates.
pub(super) fn table_struct(v: &GoVersion) -> HeapBytes {
    HeapBytes::one(TABLE_STRUCT_SIZE, true, v)
}

/// `newTable(typ, capacity)`: the table struct and `capacity/8` groups.
pub(super) fn new_table(
    capacity: u64,
    group: TypeInfo,
    v: &GoVersion,
) -> Result<HeapBytes, GrowthError> {
    Ok(table_struct(v).plus(array_bytes("newTable", capacity / GROUP_SLOTS, group, v)?))
}

/// Swiss maps: `(*Map).growToSmall`, the first group (`typ.GroupSize`, group type from
/// `typ.Group`) of a map made without a size hint.
pub fn swiss_grow_to_small(group: TypeInfo, v: &GoVersion) -> Result<SwissGrowth, GrowthError> {
    require_maps(v, MapImpl::Swiss)?;
    Ok(SwissGrowth {
        kind: MapGrowKind::Small,
        old_size: 0,
        new_size: GROUP_SLOTS,
        heap: array_bytes("growToSmall", 1, group, v)?,
    })
}

/// Swiss maps: `(*Map).growToTable`: a 16-slot table (struct + 2 groups) and a 1-entry
/// directory (`make([]*table, 1)`).
pub fn swiss_grow_to_table(group: TypeInfo, v: &GoVersion) -> Result<SwissGrowth, GrowthError> {
    require_maps(v, MapImpl::Swiss)?;
    let capacity = 2 * GROUP_SLOTS;
    let heap = new_table(capacity, group, v)?.plus(HeapBytes::one(PTR_SIZE, true, v));
    Ok(SwissGrowth {
        kind: MapGrowKind::ToTable,
        old_size: GROUP_SLOTS,
        new_size: capacity,
        heap,
    })
}

/// Swiss maps: `(*table).grow(typ, m, newCapacity)` at entry, `t.capacity` = `old_capacity`:
/// a new table of `newCapacity/8` groups (rehash only calls it with 2×capacity ≤ 1024).
pub fn swiss_table_grow(
    old_capacity: u16,
    new_capacity: u16,
    group: TypeInfo,
    v: &GoVersion,
) -> Result<SwissGrowth, GrowthError> {
    require_maps(v, MapImpl::Swiss)?;
    let new = u64::from(new_capacity);
    if !new.is_power_of_two() || !(GROUP_SLOTS..=MAX_TABLE_CAPACITY).contains(&new) {
        return Err(GrowthError::BadInput {
            what: "table grow",
            detail: format!("new capacity {new_capacity}"),
        });
    }
    Ok(SwissGrowth {
        kind: MapGrowKind::Grow,
        old_size: u64::from(old_capacity),
        new_size: new,
        heap: new_table(new, group, v)?,
    })
}

/// Swiss maps: `(*table).split`: two tables of maxTableCapacity (1024 slots, 128 groups).
pub fn swiss_table_split(group: TypeInfo, v: &GoVersion) -> Result<SwissGrowth, GrowthError> {
    require_maps(v, MapImpl::Swiss)?;
    let one = new_table(MAX_TABLE_CAPACITY, group, v)?;
    Ok(SwissGrowth {
        kind: MapGrowKind::Split,
        old_size: MAX_TABLE_CAPACITY,
        new_size: 2 * MAX_TABLE_CAPACITY,
        heap: one.plus(one),
    })
}

/// Swiss maps: `installTableSplit(old, left, right)` at entry. The directory doubles
/// (`make([]*table, 2*dirLen)`) only when `old.localDepth == m.globalDepth`; `None` otherwise.
pub fn swiss_install_split(
    old_local_depth: u8,
    global_depth: u8,
    dir_len: u64,
    v: &GoVersion,
) -> Result<Option<SwissGrowth>, GrowthError> {
    require_maps(v, MapImpl::Swiss)?;
    if old_local_depth != global_depth {
        return Ok(None);
    }
    let entries = dir_len.checked_mul(2).ok_or(GrowthError::TooLarge {
        what: "directory grow",
        bytes_hint: u64::MAX,
    })?;
    let pointer = TypeInfo {
        size: PTR_SIZE,
        has_pointers: true,
    };
    Ok(Some(SwissGrowth {
        kind: MapGrowKind::DirGrow,
        old_size: dir_len,
        new_size: entries,
        heap: array_bytes("directory grow", entries, pointer, v)?,
    }))
}
