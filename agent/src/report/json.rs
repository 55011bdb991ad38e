//! The `--json` format (documented in README.md). Field names are a public contract.

use std::collections::BTreeMap;

use allocwatch_common::libc::Api;
use serde::Serialize;

use super::{Leak, LeaksReport, ProcessInfo, Site, TopReport};
use crate::{
    aggregate::live_of,
    symbolize::{Frame, SymbolizeStats},
};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct Document<P> {
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_age_seconds: Option<f64>,
    processes: Vec<P>,
}

#[derive(Serialize)]
struct Identity<'a> {
    pid: u32,
    comm: &'a str,
    exe: &'a str,
    exited: bool,
    exit_code: Option<i32>,
    libc: &'a str,
    aliases: BTreeMap<&'static str, &'static str>,
}

impl<'a> From<&'a ProcessInfo> for Identity<'a> {
    fn from(i: &'a ProcessInfo) -> Self {
        Self {
            pid: i.pid,
            comm: &i.comm,
            exe: &i.exe,
            exited: i.exited,
            exit_code: i.exit_code,
            libc: &i.libc,
            aliases: i
                .aliases
                .iter()
                .map(|(alias, canon)| (alias.symbol(), canon.symbol()))
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct TopProcess<'a> {
    #[serde(flatten)]
    identity: Identity<'a>,
    elapsed_seconds: f64,
    calls: BTreeMap<&'static str, u64>,
    bytes: BTreeMap<&'static str, u64>,
    failed: BTreeMap<&'static str, u64>,
    live_bytes: u64,
    live_allocations: u64,
    lost: &'a BTreeMap<&'static str, u64>,
    symbolization: SymbolizeStats,
    sites: Vec<JsonSite<'a>>,
}

#[derive(Serialize)]
struct JsonSite<'a> {
    api: &'static str,
    frames: &'a [Frame],
    calls: u64,
    bytes: u64,
    failed: u64,
    live_bytes: u64,
    live_allocations: u64,
}

impl<'a> From<&'a Site> for JsonSite<'a> {
    fn from(s: &'a Site) -> Self {
        let (live_allocations, live_bytes) = live_of(&s.stats);
        Self {
            api: s.api.symbol(),
            frames: &s.frames,
            calls: s.stats.calls,
            bytes: s.stats.bytes,
            failed: s.stats.failed,
            live_bytes,
            live_allocations,
        }
    }
}

#[derive(Serialize)]
struct LeaksProcess<'a> {
    #[serde(flatten)]
    identity: Identity<'a>,
    live_bytes: u64,
    live_allocations: u64,
    lost: &'a BTreeMap<&'static str, u64>,
    symbolization: SymbolizeStats,
    leaks: Vec<JsonLeak<'a>>,
}

#[derive(Serialize)]
struct JsonLeak<'a> {
    api: &'static str,
    frames: &'a [Frame],
    count: u64,
    bytes: u64,
    oldest_age_seconds: f64,
}

impl<'a> From<&'a Leak> for JsonLeak<'a> {
    fn from(l: &'a Leak) -> Self {
        Self {
            api: l.api.symbol(),
            frames: &l.frames,
            count: l.count,
            bytes: l.bytes,
            oldest_age_seconds: l.oldest_age_secs,
        }
    }
}

fn per_api(values: &[u64]) -> BTreeMap<&'static str, u64> {
    Api::ALL
        .iter()
        .map(|a| (a.symbol(), values[*a as usize]))
        .collect()
}

pub fn top(reports: &[TopReport]) -> serde_json::Result<String> {
    let processes = reports
        .iter()
        .map(|r| TopProcess {
            identity: (&r.info).into(),
            elapsed_seconds: r.elapsed_secs,
            calls: per_api(&r.totals.calls),
            bytes: per_api(&r.totals.bytes),
            failed: per_api(&r.totals.failed),
            live_bytes: r.totals.live_bytes,
            live_allocations: r.totals.live_allocations,
            lost: &r.lost,
            symbolization: r.symbolization,
            sites: r.sites.iter().map(Into::into).collect(),
        })
        .collect();
    serde_json::to_string_pretty(&Document {
        version: FORMAT_VERSION,
        min_age_seconds: None,
        processes,
    })
}

pub fn leaks(reports: &[LeaksReport]) -> serde_json::Result<String> {
    let min_age_seconds = reports.first().map(|r| r.min_age_secs);
    let processes = reports
        .iter()
        .map(|r| LeaksProcess {
            identity: (&r.info).into(),
            live_bytes: r.live_bytes,
            live_allocations: r.live_allocations,
            lost: &r.lost,
            symbolization: r.symbolization,
            leaks: r.leaks.iter().map(Into::into).collect(),
        })
        .collect();
    serde_json::to_string_pretty(&Document {
        version: FORMAT_VERSION,
        min_age_seconds,
        processes,
    })
}
