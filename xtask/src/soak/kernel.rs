//! What the agent may leave in the kernel: BPF programs and links (listed by `bpftool … show
//! --json`, attributed through the ids the agent held in /proc/PID/fdinfo) and uprobe events in
//! tracefs (aya names those it creates `aya_<pid>_…`).

use std::{
    collections::BTreeSet,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

const UPROBE_EVENTS: &str = "/sys/kernel/tracing/uprobe_events";

/// BPF program and link ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ids {
    pub progs: BTreeSet<u32>,
    pub links: BTreeSet<u32>,
}

impl Ids {
    pub fn extend(&mut self, other: Ids) {
        self.progs.extend(other.progs);
        self.links.extend(other.links);
    }
}

/// What exists system-wide at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub ids: Ids,
    pub uprobe_events: BTreeSet<String>,
}

impl Snapshot {
    pub fn take() -> anyhow::Result<Self> {
        Ok(Self {
            ids: Ids {
                progs: bpftool_ids("prog")?,
                links: bpftool_ids("link")?,
            },
            uprobe_events: fs::read_to_string(UPROBE_EVENTS)
                .with_context(|| format!("reading {UPROBE_EVENTS} (./x setup mounts tracefs)"))?
                .lines()
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// `bpftool prog|link show --json` ids.
fn bpftool_ids(kind: &str) -> anyhow::Result<BTreeSet<u32>> {
    let out = Command::new("bpftool")
        .args([kind, "show", "--json"])
        .output()
        .context("running bpftool (Debian package bpftool; ./x setup installs it)")?;
    if !out.status.success() {
        bail!(
            "`bpftool {kind} show --json` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    ids_in_json(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading `bpftool {kind} show --json`"))
}

/// The `id` of every object of a bpftool JSON listing (an array of objects).
fn ids_in_json(text: &str) -> anyhow::Result<BTreeSet<u32>> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let items = v.as_array().ok_or_else(|| anyhow!("not a JSON array"))?;
    items
        .iter()
        .map(|o| {
            o.get("id")
                .and_then(serde_json::Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| anyhow!("an entry without a numeric id: {o}"))
        })
        .collect()
}

/// The BPF programs and links `pid` holds open (its bpf-prog and bpf_link fds' fdinfo).
pub fn held_by(pid: u32) -> Ids {
    let mut ids = Ids::default();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return ids;
    };
    for fd in fds.flatten() {
        let Ok(target) = fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if target != "anon_inode:bpf-prog" && target != "anon_inode:bpf_link" {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
        if let Ok(text) = fs::read_to_string(info) {
            ids.extend(ids_in_fdinfo(&text));
        }
    }
    ids
}

/// `prog_id:` and `link_id:` of one fdinfo (a link's fdinfo names its program too).
fn ids_in_fdinfo(text: &str) -> Ids {
    let mut ids = Ids::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let Ok(id) = v.trim().parse::<u32>() else {
            continue;
        };
        match k.trim() {
            "prog_id" => ids.progs.insert(id),
            "link_id" => ids.links.insert(id),
            _ => false,
        };
    }
    ids
}

/// What every live process holds (a program that someone holds is not the dead agent's).
fn held_by_anyone() -> Ids {
    let mut ids = Ids::default();
    let Ok(procs) = fs::read_dir("/proc") else {
        return ids;
    };
    for p in procs.flatten() {
        if let Some(pid) = p.file_name().to_str().and_then(|n| n.parse().ok()) {
            ids.extend(held_by(pid));
        }
    }
    ids
}

/// What the agent left behind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Leftovers {
    /// Programs and links still loaded that the agent held, or that appeared during the soak
    /// and no process holds.
    pub ids: Ids,
    /// uprobe_events entries the agent created (aya's `aya_<pid>_` names) still there.
    pub uprobe_events: Vec<String>,
    /// New uprobe_events entries not named after the agent (another tracer's): listed, not
    /// held against it.
    pub foreign_uprobe_events: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.ids.progs.is_empty() && self.ids.links.is_empty() && self.uprobe_events.is_empty()
    }
}

/// After the agent (`agent_pid`, which held `agent_held` while it ran) exited: what of it is
/// still in the kernel. The kernel frees BPF objects after an RCU grace period, so this looks
/// again until nothing is left or `within` has passed.
pub fn leftovers(
    before: &Snapshot,
    agent_held: &Ids,
    agent_pid: u32,
    within: Duration,
) -> anyhow::Result<Leftovers> {
    let deadline = Instant::now() + within;
    loop {
        let after = Snapshot::take()?;
        let left = attribute(before, &after, agent_held, &held_by_anyone(), agent_pid);
        if left.is_empty() || Instant::now() > deadline {
            return Ok(left);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The pure part of [`leftovers`]: objects in `after` that the agent held, or that are new
/// since `before` and held by no live process; new uprobe events named after the agent.
fn attribute(
    before: &Snapshot,
    after: &Snapshot,
    agent_held: &Ids,
    live_held: &Ids,
    agent_pid: u32,
) -> Leftovers {
    let pick = |now: &BTreeSet<u32>,
                then: &BTreeSet<u32>,
                held: &BTreeSet<u32>,
                live: &BTreeSet<u32>|
     -> BTreeSet<u32> {
        now.iter()
            .copied()
            .filter(|id| held.contains(id) || (!then.contains(id) && !live.contains(id)))
            .collect()
    };
    let ids = Ids {
        progs: pick(
            &after.ids.progs,
            &before.ids.progs,
            &agent_held.progs,
            &live_held.progs,
        ),
        links: pick(
            &after.ids.links,
            &before.ids.links,
            &agent_held.links,
            &live_held.links,
        ),
    };
    let ours = format!("aya_{agent_pid}_");
    let (uprobe_events, foreign_uprobe_events) = after
        .uprobe_events
        .difference(&before.uprobe_events)
        .cloned()
        .partition(|e| e.contains(&ours));
    Leftovers {
        ids,
        uprobe_events,
        foreign_uprobe_events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn bpftool_json_ids() {
        let json = r#"[{"id":105,"type":"kprobe","name":"malloc","map_ids":[47]},{"id":7}]"#;
        assert_eq!(ids_in_json(json).expect("parses"), set(&[7, 105]));
        assert_eq!(ids_in_json("[]").expect("parses"), set(&[]));
        assert!(ids_in_json(r#"[{"name":"x"}]"#).is_err());
        assert!(ids_in_json("{}").is_err());
    }

    #[test]
    fn fdinfo_ids() {
        let link = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nlink_type:\tuprobe_multi\nlink_id:\t12\nprog_tag:\tabc\nprog_id:\t99\n";
        assert_eq!(
            ids_in_fdinfo(link),
            Ids {
                progs: set(&[99]),
                links: set(&[12])
            }
        );
        assert_eq!(ids_in_fdinfo("pos:\t0\nflags:\t02\n"), Ids::default());
    }

    #[test]
    fn leftovers_are_what_the_agent_held_or_new_and_unheld() {
        let before = Snapshot {
            ids: Ids {
                progs: set(&[1, 2]),
                links: set(&[10]),
            },
            uprobe_events: ["p:uprobes/other /bin/x:0x10".to_owned()].into(),
        };
        let after = Snapshot {
            // 2: old and unheld (not ours); 5: ours; 6: new, held by a live process; 7: new,
            // held by nobody.
            ids: Ids {
                progs: set(&[1, 2, 5, 6, 7]),
                links: set(&[10, 11]),
            },
            uprobe_events: [
                "p:uprobes/other /bin/x:0x10".to_owned(),
                "p:uprobes/aya_4242_p__usr_lib_libc_so_6_0x1234_0 /usr/lib/libc.so.6:0x1234"
                    .to_owned(),
                "p:uprobes/aya_4243_p_x_0x1_0 /x:0x1".to_owned(),
            ]
            .into(),
        };
        let agent = Ids {
            progs: set(&[5, 8]),
            links: set(&[11]),
        };
        let live = Ids {
            progs: set(&[1, 6]),
            links: set(&[]),
        };
        let left = attribute(&before, &after, &agent, &live, 4242);
        assert_eq!(left.ids.progs, set(&[5, 7]));
        assert_eq!(left.ids.links, set(&[11]));
        assert_eq!(
            left.uprobe_events,
            ["p:uprobes/aya_4242_p__usr_lib_libc_so_6_0x1234_0 /usr/lib/libc.so.6:0x1234"]
        );
        assert_eq!(
            left.foreign_uprobe_events,
            ["p:uprobes/aya_4243_p_x_0x1_0 /x:0x1"]
        );
        assert!(!left.is_empty());

        let clean = Snapshot {
            ids: before.ids.clone(),
            uprobe_events: before.uprobe_events.clone(),
        };
        assert!(attribute(&before, &clean, &agent, &live, 4242).is_empty());
    }
}
