//! Reading what the probes recorded: per-CPU site counters, the live table, loss counters,
//! stacks, and the ring buffer of new-site notifications. Validation and decoding happen here;
//! nothing above this module sees raw map types.

use std::collections::{BTreeMap, HashSet};

use allocwatch_common::{
    Event, MAX_STACK_DEPTH,
    go::{GoHistKey, GoHistVal, GoProc, StwState},
    libc::{API_COUNT, LiveAlloc, LiveKey, Overflow, SiteKey, SiteStats},
    loss::{LOSS_CAUSES, LossCause},
    map_names,
};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
};
use thiserror::Error;

use crate::aggregate::sum_stats;

#[derive(Debug, Error)]
pub enum CollectError {
    #[error("probe map {0} is missing")]
    MissingMap(&'static str),
    #[error("reading probe map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> CollectError {
    move |source| CollectError::Map { name, source }
}

/// Site rows of `tgid` (all processes when `None`), per-CPU values summed.
pub fn sites(ebpf: &Ebpf, tgid: Option<u32>) -> Result<BTreeMap<SiteKey, SiteStats>, CollectError> {
    let name = map_names::SITES;
    let map = ebpf.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuHashMap<_, SiteKey, SiteStats> =
        PerCpuHashMap::try_from(map).map_err(map_err(name))?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (key, values) = match item {
            Ok(kv) => kv,
            // A key deleted between iteration steps; nothing to count.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(name)(e)),
        };
        if tgid.is_some_and(|t| t != key.tgid) {
            continue;
        }
        out.insert(key, sum_stats(values.iter()));
    }
    Ok(out)
}

/// Outstanding allocations of `tgid` (all processes when `None`).
pub fn live(ebpf: &Ebpf, tgid: Option<u32>) -> Result<Vec<(LiveKey, LiveAlloc)>, CollectError> {
    let name = map_names::LIVE;
    let map = ebpf.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: HashMap<_, LiveKey, LiveAlloc> = HashMap::try_from(map).map_err(map_err(name))?;
    let mut out = Vec::new();
    for item in map.iter() {
        let (key, value) = match item {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(name)(e)),
        };
        if tgid.is_none_or(|t| t == key.tgid) {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// Loss counters by cause, summed over CPUs.
pub fn lost(ebpf: &Ebpf) -> Result<BTreeMap<LossCause, u64>, CollectError> {
    let name = map_names::LOST;
    let map = ebpf.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut out = BTreeMap::new();
    for (i, cause) in LossCause::ALL.iter().enumerate().take(LOSS_CAUSES) {
        let values = map.get(&(i as u32), 0).map_err(map_err(name))?;
        out.insert(*cause, values.iter().sum());
    }
    Ok(out)
}

/// Calls that found the site table full, per API id.
pub fn overflow(ebpf: &Ebpf) -> Result<[Overflow; API_COUNT], CollectError> {
    let name = map_names::OVERFLOW;
    let map = ebpf.map(name).ok_or(CollectError::MissingMap(name))?;
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

/// A size histogram (`map_names::GO_HIST` or `LIBC_HIST`) of every process: (tgid, log2
/// bucket) → (count, bytes), CPUs summed.
pub fn hist(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<BTreeMap<(u32, u32), GoHistVal>, CollectError> {
    let map = ebpf.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: PerCpuHashMap<_, GoHistKey, GoHistVal> =
        PerCpuHashMap::try_from(map).map_err(map_err(name))?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (key, values) = match item {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(name)(e)),
        };
        let v = values
            .iter()
            .fold(GoHistVal::default(), |acc, v| GoHistVal {
                count: acc.count + v.count,
                bytes: acc.bytes + v.bytes,
            });
        out.insert((key.tgid, key.bucket), v);
    }
    Ok(out)
}

/// The user stack `id` as instruction pointers, innermost first; empty if unknown.
pub fn stack(ebpf: &Ebpf, id: i32) -> Result<Vec<u64>, CollectError> {
    if id < 0 {
        return Ok(Vec::new());
    }
    let name = map_names::STACKS;
    let map = ebpf.map(name).ok_or(CollectError::MissingMap(name))?;
    let map: HashMap<_, u32, [u64; MAX_STACK_DEPTH]> =
        HashMap::try_from(map).map_err(map_err(name))?;
    match map.get(&(id as u32), 0) {
        Ok(frames) => Ok(frames.iter().copied().take_while(|&ip| ip != 0).collect()),
        Err(MapError::KeyNotFound) => Ok(Vec::new()),
        Err(e) => Err(map_err(name)(e)),
    }
}

/// Removes the keys of an aya hash map (plain or per-CPU) that match `pred`; how many went.
macro_rules! remove_where {
    ($map:expr, $pred:expr) => {{
        let keys: Vec<_> = $map.keys().filter_map(Result::ok).filter($pred).collect();
        keys.iter().filter(|k| $map.remove(k).is_ok()).count()
    }};
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, CollectError> {
    ebpf.map_mut(name).ok_or(CollectError::MissingMap(name))
}

/// Removes the outstanding allocations for which `pred` holds; how many went.
fn remove_live_where(
    ebpf: &mut Ebpf,
    pred: impl Fn(&LiveKey, &LiveAlloc) -> bool,
) -> Result<usize, CollectError> {
    let name = map_names::LIVE;
    let mut live: HashMap<_, LiveKey, LiveAlloc> =
        HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let gone: Vec<LiveKey> = live
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, a)| pred(k, a))
        .map(|(k, _)| k)
        .collect();
    Ok(gone.iter().filter(|k| live.remove(k).is_ok()).count())
}

/// Deletes every row of the processes `tgids` from the per-process maps (exited and expired,
/// or not selected); returns how many rows went. One pass over each map for all of them (a
/// pass costs a syscall per key of the map, whoever owns it). Site rows for which `keep` is
/// true stay, with their outstanding allocations (an earlier program image's, still exported).
pub fn forget_all(
    ebpf: &mut Ebpf,
    tgids: &HashSet<u32>,
    keep: impl Fn(&SiteKey) -> bool,
) -> Result<usize, CollectError> {
    if tgids.is_empty() {
        return Ok(0);
    }
    let mut removed = 0;
    let name = map_names::SITES;
    let mut sites: PerCpuHashMap<_, SiteKey, SiteStats> =
        PerCpuHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    removed += remove_where!(sites, |k: &SiteKey| tgids.contains(&k.tgid) && !keep(k));
    removed += remove_live_where(ebpf, |k, a| tgids.contains(&k.tgid) && !keep(&a.site))?;
    for name in [map_names::GO_HIST, map_names::LIBC_HIST] {
        let mut hist: PerCpuHashMap<_, GoHistKey, GoHistVal> =
            PerCpuHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        removed += remove_where!(hist, |k: &GoHistKey| tgids.contains(&k.tgid));
    }
    let name = map_names::GO_PROCS;
    let mut procs: HashMap<_, u32, GoProc> =
        HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    removed += tgids.iter().filter(|t| procs.remove(t).is_ok()).count();
    let name = map_names::GO_STW;
    let mut stw: HashMap<_, u32, StwState> =
        HashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    removed += tgids.iter().filter(|t| stw.remove(t).is_ok()).count();
    Ok(removed)
}

/// Deletes the site rows `keys` and the outstanding allocations made at them (a program image
/// that ended at exec and whose series expired); how many rows went.
pub fn forget_sites(ebpf: &mut Ebpf, keys: &HashSet<SiteKey>) -> Result<usize, CollectError> {
    let name = map_names::SITES;
    let mut sites: PerCpuHashMap<_, SiteKey, SiteStats> =
        PerCpuHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let removed = keys.iter().filter(|k| sites.remove(k).is_ok()).count();
    Ok(removed + remove_live_where(ebpf, |_, a| keys.contains(&a.site))?)
}

/// Takes the ring buffer out of the object so it can be polled on its own.
pub fn take_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, CollectError> {
    let name = map_names::EVENTS;
    let map = ebpf.take_map(name).ok_or(CollectError::MissingMap(name))?;
    RingBuf::try_from(map).map_err(map_err(name))
}

/// Takes the ring of exec notifications (a pid per exec) out of the object.
pub fn take_exec_notify(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, CollectError> {
    let name = map_names::EXEC_NOTIFY;
    let map = ebpf.take_map(name).ok_or(CollectError::MissingMap(name))?;
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
