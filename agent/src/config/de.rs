//! The config file's value parsers (serde `deserialize_with`): each value goes through the same
//! parser as its flag (`values`), so a file and the command line accept and refuse alike.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};

use crate::{
    probes::{Capacity, Mode},
    unwind::Unwind,
    values::{self, CountLimit, ValueError},
};

/// The keys of `[capacity]`, parsed into the probes' [`Capacity`] (each value checked like its
/// flag).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CapacityKeys {
    #[serde(deserialize_with = "max_live")]
    max_live: u32,
    #[serde(deserialize_with = "max_sites")]
    max_sites: u32,
    #[serde(deserialize_with = "max_stacks")]
    max_stacks: u32,
    #[serde(deserialize_with = "max_pending")]
    max_pending: u32,
}

impl Default for CapacityKeys {
    fn default() -> Self {
        let Capacity {
            max_live,
            max_sites,
            max_stacks,
            max_pending,
        } = Capacity::default();
        CapacityKeys {
            max_live,
            max_sites,
            max_stacks,
            max_pending,
        }
    }
}

pub(super) fn capacity<'de, D: Deserializer<'de>>(d: D) -> Result<Capacity, D::Error> {
    let k = CapacityKeys::deserialize(d)?;
    Ok(Capacity {
        max_live: k.max_live,
        max_sites: k.max_sites,
        max_stacks: k.max_stacks,
        max_pending: k.max_pending,
    })
}

/// A path; empty means none (TOML has no null).
pub(super) fn optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// A duration without bounds of its own (checked by [`super::Config::validate`]).
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    values::parse_duration(&String::deserialize(d)?).map_err(custom)
}

fn custom<E: serde::de::Error>(e: ValueError) -> E {
    E::custom(e)
}

pub(super) fn ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    values::duration(&String::deserialize(d)?, &values::TTL).map_err(custom)
}

pub(super) fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    values::listen(&String::deserialize(d)?).map_err(custom)
}

fn count<'de, D: Deserializer<'de>>(d: D, limit: &CountLimit) -> Result<u64, D::Error> {
    // i64 first, so that a negative number gets the same words as on the command line.
    let n = i64::deserialize(d)?;
    let n = u64::try_from(n).map_err(|_| {
        custom::<D::Error>(
            values::count(&n.to_string(), limit).expect_err("negative counts are refused"),
        )
    })?;
    values::check_count(n, limit).map_err(custom)
}

pub(super) fn top_k<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, &values::TOP_K).map(|n| n as usize)
}

pub(super) fn max_site_series<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, &values::MAX_SITE_SERIES).map(|n| n as usize)
}

fn max_live<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_LIVE).map(|n| n as u32)
}

fn max_sites<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_SITES).map(|n| n as u32)
}

fn max_stacks<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_STACKS).map(|n| n as u32)
}

pub(super) fn sample_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    count(d, &values::SAMPLE_BYTES).map(Some)
}

fn max_pending<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    count(d, &values::MAX_PENDING).map(|n| n as u32)
}

pub(super) fn regexes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    for (i, p) in list.iter().enumerate() {
        values::regex(p)
            .map_err(|e| custom::<D::Error>(ValueError::new(format!("[{i}] {p:?}: {e}"))))?;
    }
    Ok(list)
}

/// A `--mode` value; the benchmark-only floor modes are refused.
pub(super) fn probe_mode<'de, D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
    values::public_mode(&String::deserialize(d)?).map_err(custom)
}

pub(super) fn unwind<'de, D: Deserializer<'de>>(d: D) -> Result<Unwind, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

/// `probe = ["BINARY:SYMBOL[:argN as NAME]…", …]`: each parsed as its `--probe` flag is (that
/// the binary and symbol exist is checked by [`super::Config::validate`]).
pub(super) fn probes<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<crate::target::symprobe::ProbeSpec>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse()
                .map_err(|e| custom::<D::Error>(ValueError::new(format!("[{i}] {p:?}: {e}"))))
        })
        .collect()
}
