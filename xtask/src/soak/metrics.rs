//! What the soak reads from one `/metrics` body: loss by cause, the number of sample lines,
//! every map's fill ratio, and the steady allocator's call count.

use std::collections::{BTreeMap, BTreeSet};

use crate::promtext::{Scrape, Value};
use anyhow::bail;

/// One scrape's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// `allocwatch_events_lost_total` by `cause` (every cause the agent exports, zeros too).
    pub lost: BTreeMap<String, f64>,
    /// The causes exported with `affects="detail"`: every call counted exactly, only its call
    /// site less precise (a cause without the label counts as a loss of counts).
    pub detail: BTreeSet<String>,
    /// Lines holding a sample (neither comments nor blank).
    pub sample_lines: usize,
    /// `allocwatch_map_fill_ratio` by `map`.
    pub fill: BTreeMap<String, f64>,
    /// `allocwatch_alloc_calls_total` summed over the series of the steady allocator's comm
    /// (`None`: it has no series).
    pub steady_calls: Option<f64>,
}

impl Reading {
    /// Events lost, all causes together.
    pub fn lost_total(&self) -> f64 {
        self.lost.values().sum()
    }

    /// The causes with a non-zero count.
    pub fn lost_causes(&self) -> impl Iterator<Item = (&str, f64)> {
        self.lost
            .iter()
            .filter(|(_, v)| **v != 0.0)
            .map(|(k, v)| (k.as_str(), *v))
    }

    /// Whether `cause` only takes call-site detail (counts stay exact).
    pub fn is_detail(&self, cause: &str) -> bool {
        self.detail.contains(cause)
    }
}

/// Reads a `/metrics` body (Prometheus text format). An error when it lacks
/// `allocwatch_events_lost_total`: without it "no loss" could not be told from "not exported".
pub fn read(body: &str, steady_comm: &str) -> anyhow::Result<Reading> {
    let sample_lines = body
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .count();
    let scrape = Scrape::parse(body)?;
    let mut r = Reading {
        sample_lines,
        ..Reading::default()
    };
    let mut saw_lost = false;
    for s in &scrape.samples {
        let value = match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            Value::Histogram(_) => continue,
        };
        match s.metric.as_str() {
            "allocwatch_events_lost_total" => {
                saw_lost = true;
                let cause = s.labels.get("cause").unwrap_or("(no cause label)");
                *r.lost.entry(cause.to_owned()).or_default() += value;
                if s.labels.get("affects") == Some("detail") {
                    r.detail.insert(cause.to_owned());
                }
            }
            "allocwatch_map_fill_ratio" => {
                let map = s.labels.get("map").unwrap_or("(no map label)");
                r.fill.insert(map.to_owned(), value);
            }
            "allocwatch_alloc_calls_total" if s.labels.get("comm") == Some(steady_comm) => {
                *r.steady_calls.get_or_insert(0.0) += value;
            }
            _ => {}
        }
    }
    if !saw_lost {
        bail!("no allocwatch_events_lost_total in /metrics ({sample_lines} sample lines)");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the agent's output (families, label order and a histogram copied from a
    /// real scrape), with a site label holding a comma and braces.
    const BODY: &str = r#"# HELP allocwatch_processes Running traced processes with these labels (their series are summed).
# TYPE allocwatch_processes gauge
allocwatch_processes{namespace="",pod="",container="",comm="soak_steady",exe="/w/target/fixtures/soak_steady"} 1
# HELP allocwatch_alloc_calls_total Malloc-family calls by API.
# TYPE allocwatch_alloc_calls_total counter
allocwatch_alloc_calls_total{namespace="",pod="",container="",comm="soak_steady",exe="/w/target/fixtures/soak_steady",api="calloc"} 0
allocwatch_alloc_calls_total{namespace="",pod="",container="",comm="soak_steady",exe="/w/target/fixtures/soak_steady",api="malloc"} 2900
allocwatch_alloc_calls_total{namespace="",pod="",container="",comm="soak_steady",exe="/w/target/fixtures/soak_steady",api="realloc"} 4
allocwatch_alloc_calls_total{namespace="",pod="",container="",comm="python3",exe="/usr/bin/python3.11",api="malloc"} 77
# HELP allocwatch_alloc_size_bytes Requested sizes.
# TYPE allocwatch_alloc_size_bytes histogram
allocwatch_alloc_size_bytes_bucket{comm="soak_steady",le="16"} 0
allocwatch_alloc_size_bytes_bucket{comm="soak_steady",le="+Inf"} 2900
allocwatch_alloc_size_bytes_sum{comm="soak_steady"} 1000
allocwatch_alloc_size_bytes_count{comm="soak_steady"} 2900
# TYPE allocwatch_site_alloc_calls_total counter
allocwatch_site_alloc_calls_total{comm="x",site="f<a, b>{}"} 3

# HELP allocwatch_events_lost_total Events lost by cause, all processes (counts are low while this rises).
# TYPE allocwatch_events_lost_total counter
allocwatch_events_lost_total{cause="live_map_full",affects="live"} 0
allocwatch_events_lost_total{cause="ringbuf_full",affects="counts"} 103006
allocwatch_events_lost_total{cause="symbolize_process_gone"} 445
allocwatch_events_lost_total{cause="unwind_truncated",affects="detail"} 7
# HELP allocwatch_map_fill_ratio Fill level of each kernel map (1 = full: new entries are dropped).
# TYPE allocwatch_map_fill_ratio gauge
allocwatch_map_fill_ratio{map="SITES"} 0.3671417236328125
allocwatch_map_fill_ratio{map="TGIDS"} 1
"#;

    #[test]
    fn reads_loss_fill_lines_and_the_steady_allocator() {
        let r = read(BODY, "soak_steady").expect("reads");
        assert_eq!(r.sample_lines, 16);
        assert_eq!(r.lost_total(), 103_458.0);
        assert_eq!(
            r.lost_causes().collect::<Vec<_>>(),
            [
                ("ringbuf_full", 103_006.0),
                ("symbolize_process_gone", 445.0),
                ("unwind_truncated", 7.0)
            ]
        );
        assert_eq!(r.lost.len(), 4);
        // Without the label (an older agent): taken as a loss of counts.
        assert!(r.is_detail("unwind_truncated"));
        assert!(!r.is_detail("ringbuf_full") && !r.is_detail("symbolize_process_gone"));
        assert_eq!(
            r.fill.into_iter().collect::<Vec<_>>(),
            [
                ("SITES".to_owned(), 0.3671417236328125),
                ("TGIDS".to_owned(), 1.0)
            ]
        );
        assert_eq!(r.steady_calls, Some(2904.0));
    }

    #[test]
    fn a_missing_steady_allocator_is_none_and_missing_loss_is_an_error() {
        let r = read(BODY, "nobody").expect("reads");
        assert_eq!(r.steady_calls, None);
        let without_loss: String = BODY
            .lines()
            .filter(|l| !l.contains("events_lost"))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = read(&without_loss, "soak_steady").unwrap_err().to_string();
        assert!(e.contains("no allocwatch_events_lost_total"), "{e}");
    }
}
