//! Reading what the probes recorded: per-CPU site counters, the live table, loss counters,
//! stacks, and the ring buffer of new-site notifications. Validation and decoding happen here;
//! nothing above this module sees raw map types. Whole maps are read in batches (`batch.rs`).

use std::collections::BTreeMap;

use allocwatch_common::{
    Event, MAX_STACK_DEPTH,
    event::ProgramKey,
    go::{GoHistKey, GoHistVal},
    libc::{API_COUNT, LiveAlloc, LiveKey, Overflow, SiteKey, SiteStats},
    loss::{LOSS_CAUSES, LossCause},
    map_names,
    symprobe::{ProbeSiteKey, ProbeSiteStats},
};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
};
use thiserror::Error;

pub use self::batch::{BatchError, Cursor, RawMap};
use crate::{aggregate::sum_stats, probes::Probes};

mod batch;

#[derive(Debug, Error)]
pub enum CollectError {
    #[error("probe map {0} is missing")]
    MissingMap(&'static str),
    #[error("reading probe map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// What the maps are read from: the loaded probes (the probe-level tests read a bare object).
pub trait MapSource {
    fn map(&self, name: &str) -> Option<&Map>;
    /// Takes a map out (a ring buffer polled on its own).
    fn take_map(&mut self, name: &str) -> Option<Map>;
}

impl MapSource for Probes {
    fn map(&self, name: &str) -> Option<&Map> {
        Probes::map(self, name)
    }

    fn take_map(&mut self, name: &str) -> Option<Map> {
        Probes::take_map(self, name)
    }
}

impl MapSource for Ebpf {
    fn map(&self, name: &str) -> Option<&Map> {
        Ebpf::map(self, name)
    }

    fn take_map(&mut self, name: &str) -> Option<Map> {
        Ebpf::take_map(self, name)
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> CollectError {
    move |source| CollectError::Map { name, source }
}

/// Site rows of `tgid` (all processes when `None`), per-CPU values summed: the site table's
/// and the rows of unknown sites (`SPILL`, keys that are [`SiteKey::is_spill`]).
pub fn sites(
    probes: &impl MapSource,
    tgid: Option<u32>,
) -> Result<BTreeMap<SiteKey, SiteStats>, CollectError> {
    let mut out = BTreeMap::new();
    for name in SITE_TABLES {
        let map = RawMap::of::<SiteKey, SiteStats>(map_ref(probes, name)?, name)?;
        map.scan(
            &mut Cursor::default(),
            usize::MAX,
            |key: &SiteKey, values: &[SiteStats]| {
                if tgid.is_none_or(|t| t == key.tgid) {
                    out.insert(*key, sum_stats(values.iter()));
                }
            },
        )?;
    }
    Ok(out)
}

/// Symbol-probe rows of `tgid` (all processes when `None`), per-CPU values summed.
pub fn probe_sites(
    probes: &impl MapSource,
    tgid: Option<u32>,
) -> Result<BTreeMap<ProbeSiteKey, ProbeSiteStats>, CollectError> {
    let name = map_names::PROBE_SITES;
    let map = RawMap::of::<ProbeSiteKey, ProbeSiteStats>(map_ref(probes, name)?, name)?;
    let mut out = BTreeMap::new();
    map.scan(
        &mut Cursor::default(),
        usize::MAX,
        |key: &ProbeSiteKey, values: &[ProbeSiteStats]| {
            if tgid.is_none_or(|t| t == key.tgid) {
                let sum: &mut ProbeSiteStats = out.entry(*key).or_default();
                for v in values {
                    sum.calls += v.calls;
                    for (s, a) in sum.args.iter_mut().zip(v.args) {
                        *s = s.wrapping_add(a);
                    }
                }
            }
        },
    )?;
    Ok(out)
}

/// The tables of site rows: calls at known sites, and each process's rows of unknown sites.
pub const SITE_TABLES: [&str; 2] = [map_names::SITES, map_names::SPILL];

/// The table that holds the row of `key`.
pub fn site_table(key: &SiteKey) -> &'static str {
    if key.is_spill() {
        map_names::SPILL
    } else {
        map_names::SITES
    }
}

/// Outstanding allocations of `tgid` (all processes when `None`).
pub fn live(
    probes: &impl MapSource,
    tgid: Option<u32>,
) -> Result<Vec<(LiveKey, LiveAlloc)>, CollectError> {
    let name = map_names::LIVE;
    let map = RawMap::of::<LiveKey, LiveAlloc>(map_ref(probes, name)?, name)?;
    let mut out = Vec::new();
    map.scan(
        &mut Cursor::default(),
        usize::MAX,
        |key: &LiveKey, v: &[LiveAlloc]| {
            if tgid.is_none_or(|t| t == key.tgid) {
                out.push((*key, v[0]));
            }
        },
    )?;
    Ok(out)
}

/// Loss counters by cause, summed over CPUs.
pub fn lost(probes: &impl MapSource) -> Result<BTreeMap<LossCause, u64>, CollectError> {
    let name = map_names::LOST;
    let map = probes.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut out = BTreeMap::new();
    for (i, cause) in LossCause::ALL.iter().enumerate().take(LOSS_CAUSES) {
        let values = map.get(&(i as u32), 0).map_err(map_err(name))?;
        out.insert(*cause, values.iter().sum());
    }
    Ok(out)
}

/// Rows in map `name` now, and its capacity (one batched walk).
pub fn count_rows<K: aya::Pod, V: aya::Pod>(
    probes: &impl MapSource,
    name: &'static str,
) -> Result<(u64, u32), CollectError> {
    let map = RawMap::of::<K, V>(map_ref(probes, name)?, name)?;
    let mut n = 0u64;
    map.scan(&mut Cursor::default(), usize::MAX, |_: &K, _: &[V]| n += 1)?;
    Ok((n, map.max_entries()))
}

/// Rows the probe ever created in the site table (all CPUs).
pub fn site_rows_created(probes: &impl MapSource) -> Result<u64, CollectError> {
    let name = map_names::SITE_ROWS;
    let map = probes.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    Ok(map.get(&0, 0).map_err(map_err(name))?.iter().sum())
}

/// Calls that found the site table full, per API id.
pub fn overflow(probes: &impl MapSource) -> Result<[Overflow; API_COUNT], CollectError> {
    let name = map_names::OVERFLOW;
    let map = probes.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuArray<_, Overflow> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut out = [Overflow::default(); API_COUNT];
    for (i, slot) in out.iter_mut().enumerate() {
        for v in map.get(&(i as u32), 0).map_err(map_err(name))?.iter() {
            slot.calls += v.calls;
            slot.bytes += v.bytes;
        }
    }
    Ok(out)
}

/// Calls and bytes per API of each program a followed process ran, by (tgid, its exec count).
pub type ProgramCounts = BTreeMap<(u32, u32), [Overflow; API_COUNT]>;

/// Following a tree: [`ProgramCounts`], CPUs summed; and the calls the table had no room for.
pub fn programs(probes: &impl MapSource) -> Result<(ProgramCounts, u64), CollectError> {
    let name = map_names::PROGRAMS;
    let map = RawMap::of::<ProgramKey, Overflow>(map_ref(probes, name)?, name)?;
    let mut out = ProgramCounts::new();
    map.scan(
        &mut Cursor::default(),
        usize::MAX,
        |key: &ProgramKey, values: &[Overflow]| {
            let row = out
                .entry((key.tgid, key.execs))
                .or_insert([Overflow::default(); API_COUNT]);
            if let Some(slot) = row.get_mut(key.api as usize) {
                for v in values {
                    slot.calls += v.calls;
                    slot.bytes += v.bytes;
                }
            }
        },
    )?;
    let name = map_names::FOLLOW_LOST;
    let map = probes.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let lost = map.get(&0, 0).map_err(map_err(name))?.iter().sum();
    Ok((out, lost))
}

/// A size histogram (`map_names::GO_HIST` or `LIBC_HIST`) of every process: (tgid, log2
/// bucket) → (count, bytes), CPUs summed.
pub fn hist(
    probes: &impl MapSource,
    name: &'static str,
) -> Result<BTreeMap<(u32, u32), GoHistVal>, CollectError> {
    let map = RawMap::of::<GoHistKey, GoHistVal>(map_ref(probes, name)?, name)?;
    let mut out = BTreeMap::new();
    map.scan(
        &mut Cursor::default(),
        usize::MAX,
        |key: &GoHistKey, values: &[GoHistVal]| {
            out.insert((key.tgid, key.bucket), sum_hist(values));
        },
    )?;
    Ok(out)
}

/// One histogram bucket's per-CPU values summed.
pub fn sum_hist(values: &[GoHistVal]) -> GoHistVal {
    values
        .iter()
        .fold(GoHistVal::default(), |acc, v| GoHistVal {
            count: acc.count + v.count,
            bytes: acc.bytes + v.bytes,
        })
}

/// The user stack `id` as instruction pointers, innermost first; empty if unknown.
pub fn stack(probes: &impl MapSource, id: i64) -> Result<Vec<u64>, CollectError> {
    if id < 0 {
        return Ok(Vec::new());
    }
    let name = map_names::STACKS;
    let map = probes.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: HashMap<_, u64, [u64; MAX_STACK_DEPTH]> =
        HashMap::try_from(map).map_err(map_err(name))?;
    match map.get(&(id as u64), 0) {
        Ok(frames) => Ok(frames.iter().copied().take_while(|&ip| ip != 0).collect()),
        Err(MapError::KeyNotFound) => Ok(Vec::new()),
        Err(e) => Err(map_err(name)(e)),
    }
}

pub fn map_ref<'a>(
    probes: &'a impl MapSource,
    name: &'static str,
) -> Result<&'a Map, CollectError> {
    probes.map(name).ok_or(CollectError::MissingMap(name))
}

/// Takes the ring buffer out of the object so it can be polled on its own.
pub fn take_events(probes: &mut impl MapSource) -> Result<RingBuf<MapData>, CollectError> {
    let name = map_names::EVENTS;
    let map = probes
        .take_map(name)
        .ok_or(CollectError::MissingMap(name))?;
    RingBuf::try_from(map).map_err(map_err(name))
}

/// Takes the ring of exec notifications (a pid per exec) out of the object.
pub fn take_exec_notify(probes: &mut impl MapSource) -> Result<RingBuf<MapData>, CollectError> {
    let name = map_names::EXEC_NOTIFY;
    let map = probes
        .take_map(name)
        .ok_or(CollectError::MissingMap(name))?;
    RingBuf::try_from(map).map_err(map_err(name))
}

/// Drains every record ready in `ring`. Records that fail validation are counted, not guessed at.
pub fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>) -> u64 {
    let mut bad = 0;
    while let Some(item) = ring.next() {
        match Event::try_from(&*item) {
            Ok(ev) => out.push(ev),
            Err(_) => bad += 1,
        }
    }
    bad
}
