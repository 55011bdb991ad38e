//! Verdicts and the table on records built by hand: a soak that passes, and one shaped like
//! issue 17's failed run.

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

fn reading(lost: &[(&str, f64)], steady: f64) -> Reading {
    Reading {
        lost: lost.iter().map(|(c, v)| (c.to_string(), *v)).collect(),
        // As the agent labels them (`affects="detail"`).
        detail: lost
            .iter()
            .filter(|(c, _)| c.starts_with("unwind_") || c.starts_with("stack_"))
            .map(|(c, _)| c.to_string())
            .collect(),
        sample_lines: 6600,
        fill: [("SITES".to_owned(), 0.5), ("TGIDS".to_owned(), 0.01)].into(),
        steady_calls: Some(steady),
    }
}

fn scrape(at: u64, rss_mib: u64, latency: Duration, reading: Result<Reading, Failure>) -> Scrape {
    Scrape {
        planned: S(at),
        at: S(at) + MS(2),
        rss_kib: Some(rss_mib * 1024),
        cpu_secs: Some(at as f64 / 10.0),
        latency,
        reading,
    }
}

/// Two minutes, scrapes every 10 s, probes every second: everything within the limits.
fn passing() -> Run {
    let zero = [("live_map_full", 0.0), ("ringbuf_full", 0.0)];
    Run {
        command: "./x soak --minutes 2 --ttl 20s --scrape-every 10s".into(),
        duration: S(120),
        client_timeout: S(20),
        probes: (0..=120)
            .map(|t| Probe {
                at: S(t),
                latency: MS(3),
                answer: Ok(()),
            })
            .collect(),
        scrapes: (0..=12)
            .map(|i| {
                let t = i * 10;
                scrape(
                    t,
                    100 + i,
                    MS(15),
                    Ok(reading(&zero, 1000.0 * (t + 1) as f64)),
                )
            })
            .collect(),
        skipped_scrapes: Vec::new(),
        stop: Stop::Exited {
            after: MS(310),
            success: true,
            status: "exit status: 0".into(),
        },
        agent_held: Ids {
            progs: [1, 2, 3].into(),
            links: [4].into(),
        },
        agent_pid: 4242,
        leftovers: Ok(Leftovers::default()),
        churn: Churn {
            started: [("libc_fixture", 80), ("python3", 80), ("sh", 80)].into(),
            failed: Vec::new(),
            skipped: 0,
        },
        steady_comm: "soak_steady",
    }
}

fn failed(run: &Run) -> Vec<String> {
    verdicts(run)
        .into_iter()
        .filter(|v| !v.pass)
        .map(|v| v.line())
        .collect()
}

#[test]
fn a_clean_run_passes_every_criterion() {
    let run = passing();
    let v = verdicts(&run);
    assert_eq!(v.len(), 8);
    assert_eq!(failed(&run), Vec::<String>::new());
    assert_eq!(
        v[0].measured, "121 probes, slowest 3.0 ms",
        "healthz measured"
    );
    // Baseline: the scrape planned at 60 s (106 MiB); end: the last one (112 MiB).
    assert_eq!(
        v[2].measured,
        "106.0 MiB at t = 60 s, 112.0 MiB at t = 120 s (+5.7 %)"
    );
    assert_eq!(v[3].measured, "0 lost from t = 0 s to t = 120 s");
    assert_eq!(
        v[4].measured,
        "exited (exit status: 0) 0.31 s after SIGTERM"
    );
    assert_eq!(
        v[5].measured,
        "nothing: the 3 programs and 1 links it held are gone, no `aya_4242_` uprobe event"
    );
    assert_eq!(v[6].measured, "1,000 → 121.0 k calls over 13 scrapes");
    assert_eq!(
        v[7].measured,
        "240 started (80 libc_fixture, 80 python3, 80 sh; 2.00/s); all exited 0"
    );
}

/// Issue 17's run: slow and then unanswered requests, RSS growth, loss, SIGTERM ignored.
#[test]
fn the_issue_17_run_fails_every_agent_criterion() {
    let mut run = passing();
    run.command = "./x soak".into();
    run.duration = S(600);
    let lost = |m: f64| {
        reading(
            &[
                ("site_map_full", m * 0.47),
                ("live_map_full", m * 0.28),
                ("ringbuf_full", m * 0.01),
            ],
            m,
        )
    };
    run.scrapes = vec![
        scrape(0, 123, MS(660), Ok(lost(57_000.0))),
        scrape(60, 172, MS(1470), Ok(lost(11.7e6))),
        scrape(301, 281, MS(4330), Ok(lost(46.2e6))),
        scrape(571, 320, MS(1220), Ok(lost(80.6e6))),
        scrape(601, 324, S(20), Err(Failure::TimedOut)),
    ];
    run.probes = (0..=600)
        .map(|t| Probe {
            at: S(t),
            latency: if t < 600 { MS(5) } else { S(20) },
            answer: if t < 600 {
                Ok(())
            } else {
                Err(Failure::TimedOut)
            },
        })
        .collect();
    run.stop = Stop::Killed { waited: S(10) };
    run.leftovers = Ok(Leftovers::default());
    let lines = failed(&run);
    assert_eq!(
        lines,
        [
            "FAIL /healthz answered within 1 s at every probe: 601 probes, slowest 20.00 s; \
             first failure at t = 600 s; 1 unanswered within 20 s",
            "FAIL /metrics answered within 1 s at every scrape: 5 scrapes, slowest 20.00 s; \
             first failure at t = 60 s; 3 slower than 1.00 s; 1 unanswered within 20 s",
            "FAIL RSS at the end within 20 % of RSS after the first minute: 172.0 MiB at \
             t = 60 s, 324.0 MiB at t = 601 s (+88.4 %)",
            "FAIL no event lost that counts or live bytes need, after the first scrape: 61.2 M \
             lost from t = 0 s to t = 571 s: site_map_full 37.9 M, live_map_full 22.6 M, \
             ringbuf_full 805.4 k; by the first scrape: site_map_full 26.8 k, live_map_full \
             16.0 k, ringbuf_full 570; unknown after that (later scrapes unanswered)",
            "FAIL SIGTERM: the agent exits (status 0) within 1 s: still running 10.0 s after \
             SIGTERM: killed with SIGKILL",
            "FAIL workload: the steady allocator's calls (comm soak_steady) rose at every \
             scrape: not seen at t = 601 s (/metrics unanswered)",
        ]
    );
    let table = table(
        &run.probes,
        &run.scrapes,
        run.client_timeout,
        run.steady_comm,
    );
    assert_eq!(table.lines().count(), 2 + 5, "{table}");
    assert!(
        table.lines().last().is_some_and(
            |l| l == "| 601 | 324.0 | timeout (20 s) | timeout (20 s) | — | — | — | 60.1 | — |"
        ),
        "{table}"
    );
    assert!(
        table.contains(
            "| 571 | 320.0 | 1.22 s | 5.0 ms | 61.3 M (site_map_full 37.9 M, live_map_full \
             22.6 M, ringbuf_full 806.0 k) | 6600 | SITES 0.50, TGIDS 0.01 | 57.1 | 80.6 M |"
        ),
        "{table}"
    );
}

#[test]
fn rss_may_move_20_percent_either_way() {
    let with_end = |mib: u64| {
        let mut run = passing();
        run.scrapes[6].rss_kib = Some(100 * 1024);
        run.scrapes[12].rss_kib = Some(mib * 1024);
        verdicts(&run)[2].pass
    };
    assert!(with_end(120));
    assert!(!with_end(121));
    assert!(with_end(80));
    assert!(!with_end(79));
}

#[test]
fn one_slow_probe_or_scrape_fails() {
    let mut run = passing();
    run.probes[42].latency = MS(1001);
    run.scrapes[3].latency = MS(1001);
    let v = verdicts(&run);
    assert!(!v[0].pass);
    assert_eq!(
        v[0].measured,
        "121 probes, slowest 1.00 s; first failure at t = 42 s; 1 slower than 1.00 s"
    );
    assert!(!v[1].pass);
    run.probes[42].latency = MS(999);
    run.scrapes[3].latency = MS(1000);
    assert!(verdicts(&run)[0].pass && verdicts(&run)[1].pass);
    run.probes[7].answer = Err(Failure::Failed("connection refused".into()));
    let v = verdicts(&run);
    assert!(!v[0].pass);
    assert!(
        v[0].measured
            .ends_with("1 failed (first: connection refused)"),
        "{}",
        v[0].measured
    );
}

#[test]
fn any_loss_fails_and_names_its_causes() {
    let mut run = passing();
    run.scrapes[12].reading = Ok(reading(
        &[("ringbuf_full", 3.0), ("live_map_full", 0.0)],
        5e5,
    ));
    let v = &verdicts(&run)[3];
    assert!(!v.pass);
    assert_eq!(
        v.measured,
        "3 lost from t = 0 s to t = 120 s: ringbuf_full 3"
    );
}

/// Calls in flight while the probes attached (before the first scrape) and causes that only
/// take call-site detail are said, not failed; a count lost later still fails.
#[test]
fn attach_time_and_detail_only_loss_are_said_not_failed() {
    let mut run = passing();
    let n = run.scrapes.len();
    for (i, sc) in run.scrapes.iter_mut().enumerate() {
        let truncated = 1000.0 * i as f64;
        sc.reading = Ok(reading(
            &[
                ("orphan_return", 2.0),
                ("unwind_truncated", truncated),
                ("live_map_full", 0.0),
            ],
            5e5,
        ));
    }
    let v = &verdicts(&run)[3];
    assert!(v.pass, "{}", v.measured);
    assert_eq!(
        v.measured,
        format!(
            "0 lost from t = 0 s to t = 120 s; by the first scrape: orphan_return 2; call-site \
             detail only, counts exact: unwind_truncated {}",
            fmt_count(1000.0 * (n - 1) as f64)
        )
    );
    run.scrapes[n - 1].reading = Ok(reading(
        &[("orphan_return", 3.0), ("unwind_truncated", 5.0)],
        5e5,
    ));
    let v = &verdicts(&run)[3];
    assert!(!v.pass);
    assert!(
        v.measured
            .starts_with("1 lost from t = 0 s to t = 120 s: orphan_return 1;"),
        "{}",
        v.measured
    );
}

#[test]
fn a_flat_or_missing_steady_allocator_fails() {
    let mut run = passing();
    let calls = run.scrapes[4].reading.as_ref().expect("read").steady_calls;
    if let Ok(r) = &mut run.scrapes[5].reading {
        r.steady_calls = calls;
    }
    let v = &verdicts(&run)[6];
    assert!(!v.pass);
    assert_eq!(v.measured, "41.0 k at t = 40 s, 41.0 k at t = 50 s");
    if let Ok(r) = &mut run.scrapes[0].reading {
        r.steady_calls = None;
    }
    assert_eq!(
        verdicts(&run)[6].measured,
        "no series for comm soak_steady at t = 0 s"
    );
}

#[test]
fn an_early_death_a_slow_exit_leftovers_and_bad_churn_fail() {
    let mut run = passing();
    run.stop = Stop::DiedEarly {
        at: S(95),
        status: "signal: 9 (SIGKILL)".into(),
    };
    run.leftovers = Ok(Leftovers {
        ids: Ids {
            progs: [2].into(),
            links: [].into(),
        },
        uprobe_events: vec!["p:uprobes/aya_4242_p_x /x:0x1".into()],
        foreign_uprobe_events: vec!["p:uprobes/other /y:0x2".into()],
    });
    run.churn.failed.push("python3: exit status: 1".into());
    let lines = failed(&run);
    assert_eq!(
        lines,
        [
            "FAIL SIGTERM: the agent exits (status 0) within 1 s: the agent ended by itself at \
             t = 95 s (signal: 9 (SIGKILL)), before the SIGTERM",
            "FAIL nothing of the agent left in the kernel: left: programs {2}; 1 uprobe events \
             (first: `p:uprobes/aya_4242_p_x /x:0x1`) (1 new uprobe events of other tracers \
             not counted)",
            "FAIL workload: every short-lived program exited 0: 240 started (80 libc_fixture, 80 \
             python3, 80 sh; 2.00/s); 1 did not exit 0 (first: python3: exit status: 1)",
        ]
    );
    run.stop = Stop::Exited {
        after: MS(2001),
        success: true,
        status: "exit status: 0".into(),
    };
    assert!(!verdicts(&run)[4].pass);
    run.stop = Stop::Exited {
        after: MS(100),
        success: false,
        status: "exit status: 101".into(),
    };
    assert!(!verdicts(&run)[4].pass);
    run.leftovers = Err("bpftool not found".into());
    assert_eq!(verdicts(&run)[5].measured, "not checked: bpftool not found");
}

#[test]
fn counts_and_latencies_read_well() {
    assert_eq!(fmt_count(0.0), "0");
    assert_eq!(fmt_count(445.0), "445");
    assert_eq!(fmt_count(9_999.0), "9,999");
    assert_eq!(fmt_count(57_000.0), "57.0 k");
    assert_eq!(fmt_count(11.7e6), "11.7 M");
    assert_eq!(fmt_count(1.2e9), "1.20 G");
    assert_eq!(fmt_latency(MS(3)), "3.0 ms");
    assert_eq!(fmt_latency(MS(660)), "660 ms");
    assert_eq!(fmt_latency(MS(1470)), "1.47 s");
}

/// Loss and the steady allocator must be seen at the end: an unanswered last scrape is not
/// "no loss", and skipped scrapes are named.
#[test]
fn an_unanswered_last_scrape_leaves_loss_and_the_workload_unproven() {
    let mut run = passing();
    run.scrapes[12].reading = Err(Failure::TimedOut);
    run.scrapes[12].latency = S(20);
    run.skipped_scrapes = vec![S(110)];
    let v = verdicts(&run);
    assert!(!v[3].pass);
    assert_eq!(
        v[3].measured,
        "0 lost from t = 0 s to t = 110 s; unknown after that (later scrapes unanswered)"
    );
    assert!(!v[6].pass);
    assert_eq!(v[6].measured, "not seen at t = 120 s (/metrics unanswered)");
    assert_eq!(
        v[1].measured,
        "13 scrapes, slowest 20.00 s; first failure at t = 120 s; 1 unanswered within 20 s; 1 \
         planned scrapes skipped (the one before still in flight)"
    );
}
