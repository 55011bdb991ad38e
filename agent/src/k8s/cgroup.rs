//! Container and pod identity from `/proc/<pid>/cgroup`.
//!
//! The kubelet names pod cgroups from the pod UID and QoS class, and every container runtime names
//! the container's cgroup from its 64-hex id, so the path alone identifies both. The shapes handled
//! here (all seen on real nodes):
//!
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
//!   cri-containerd-<id>.scope` (`crio-<id>.scope`, `docker-<id>.scope`); the kubelet writes the
//!   UID's dashes as underscores (systemd reserves `-` for the slice hierarchy), guaranteed pods
//!   have no QoS slice (`kubepods-pod<uid>.slice`), kind nests it all under `kubelet.slice`.
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (CRI-O: `crio-<id>`), guaranteed pods
//!   directly under `/kubepods`.
//! - containerd given a systemd-style path without systemd: `…/kubepods-…-pod<uid>.slice:cri-containerd:<id>`.
//! - plain Docker and Podman: `/docker/<id>`, `/system.slice/docker-<id>.scope`,
//!   `/machine.slice/libpod-<id>.scope`.
//! - crun's extra leaf (`…/crio-<id>.scope/container`), and relative paths (`/../../kubepods-…`)
//!   that the kernel prints when the reader sits in its own cgroup namespace, as a DaemonSet pod
//!   does on cgroup v2.
//!
//! CRI-O's and Podman's monitor scopes (`crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`) are
//! runtime overhead, not the container, so they yield no container id.

use std::{borrow::Cow, fmt};
#[cfg(test)]
use std::{
    io,
    path::{Path, PathBuf},
};

/// The container runtime that named the cgroup, when the name says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    Podman,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::Crio => "cri-o",
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kubernetes QoS class, spelled as in `status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

impl fmt::Display for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a cgroup path says about a process. All `None` for host processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub runtime: Option<Runtime>,
    /// 64 lowercase hex digits.
    pub container_id: Option<String>,
    /// Dashed form as in `metadata.uid` (or the 32-hex hash the kubelet gives static pods).
    pub pod_uid: Option<String>,
    pub qos: Option<Qos>,
}

impl ContainerRef {
    /// Nothing container-like was found.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[derive(Debug, thiserror::Error)]
#[cfg(test)]
pub enum CgroupError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// Reads and parses `<proc_root>/<pid>/cgroup`. A process that has exited gives a `Read` error
/// whose source is `NotFound`.
#[cfg(test)]
pub fn read(proc_root: &Path, pid: u32) -> Result<ContainerRef, CgroupError> {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    // Cgroup names are bytes; a non-UTF-8 name cannot be a runtime's, so lossy is enough.
    let bytes = std::fs::read(&path).map_err(|source| CgroupError::Read { path, source })?;
    Ok(parse(&String::from_utf8_lossy(&bytes)))
}

/// Parses the content of a `/proc/<pid>/cgroup` file (v2 `0::/path`, v1 or hybrid
/// `N:controllers:/path` lines). The v2 line wins; on v1 and hybrid hosts the `memory`, then
/// `cpu`, then `name=systemd` hierarchy is used, because a hybrid host's v2 line is often just
/// `0::/` while the v1 hierarchies hold the kubelet's layout.
pub fn parse(content: &str) -> ContainerRef {
    let mut v2 = None;
    let mut memory = None;
    let mut cpu = None;
    let mut systemd = None;
    for line in content.lines() {
        // The path is last and may itself contain ':' (containerd's `slice:prefix:id` form).
        let mut fields = line.trim_end().splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2.get_or_insert(path);
            continue;
        }
        for controller in controllers.split(',') {
            let slot = match controller {
                "memory" => &mut memory,
                "cpu" => &mut cpu,
                "name=systemd" => &mut systemd,
                _ => continue,
            };
            slot.get_or_insert(path);
        }
    }
    let candidates = [v2, memory, cpu, systemd];
    let parsed = candidates.iter().flatten().map(|p| parse_path(p));
    let mut fallback = None;
    for r in parsed {
        if r.container_id.is_some() {
            return r;
        }
        if fallback.is_none() && !r.is_empty() {
            fallback = Some(r);
        }
    }
    fallback.unwrap_or_default()
}

/// Parses one cgroup path. The outermost container wins: in Docker-in-Docker or a pod running its
/// own runtime, the outer id is the one the node's runtime and the Kubernetes API know.
pub fn parse_path(path: &str) -> ContainerRef {
    let mut out = ContainerRef::default();
    let mut prev: Option<Cow<'_, str>> = None;
    for token in tokens(path) {
        if let Some((uid, qos)) = systemd_pod_slice(&token) {
            out.pod_uid = Some(uid);
            out.qos = qos;
        } else if let Some(uid) = token.strip_prefix("pod").and_then(pod_uid) {
            // cgroupfs driver: the QoS class is the parent directory.
            out.pod_uid = Some(uid);
            out.qos = match prev.as_deref() {
                Some("burstable") => Some(Qos::Burstable),
                Some("besteffort") => Some(Qos::BestEffort),
                Some("kubepods") => Some(Qos::Guaranteed),
                _ => None,
            };
        } else {
            match container_scope(&token, prev.as_deref()) {
                Scope::Container(runtime, id) => {
                    out.runtime = runtime;
                    out.container_id = Some(id);
                    return out;
                }
                Scope::Monitor(runtime) => {
                    out.runtime = Some(runtime);
                    return out;
                }
                Scope::Other => {}
            }
        }
        prev = Some(token);
    }
    out
}

/// Path components, with containerd's `slice:prefix:id` leaf rewritten to `prefix-id` after its
/// slice, so it parses like the systemd scope it stands for.
fn tokens(path: &str) -> impl Iterator<Item = Cow<'_, str>> {
    path.split('/').filter(|c| !c.is_empty()).flat_map(|c| {
        let mut parts = c.split(':');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(slice), Some(prefix), Some(id), None) => {
                vec![Cow::Borrowed(slice), Cow::Owned(format!("{prefix}-{id}"))]
            }
            _ => vec![Cow::Borrowed(c)],
        }
    })
}

/// `kubepods-burstable-pod<uid_with_underscores>.slice` (and `kubelet-kubepods-…` under kind).
/// The QoS class is in the slice name itself, so it survives a relative (cgroupns) path.
fn systemd_pod_slice(token: &str) -> Option<(String, Option<Qos>)> {
    let stem = token.strip_suffix(".slice")?;
    // The escaped UID has no dashes, so the last dash ends the parent's name.
    let (parent, pod) = stem.rsplit_once('-')?;
    let uid = pod_uid(pod.strip_prefix("pod")?)?;
    let qos = match parent.rsplit('-').next() {
        Some("burstable") => Qos::Burstable,
        Some("besteffort") => Qos::BestEffort,
        Some("kubepods") => Qos::Guaranteed,
        _ => return None,
    };
    Some((uid, Some(qos)))
}

/// Normalizes a pod UID as found in a cgroup name: a UUID (dashes or systemd's underscores), or
/// the 32-hex hash the kubelet uses as the UID of static pods.
fn pod_uid(raw: &str) -> Option<String> {
    let uid: String = raw
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let b = uid.as_bytes();
    let uuid = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    let hash = b.len() == 32 && b.iter().all(u8::is_ascii_hexdigit);
    (uuid || hash).then_some(uid)
}

enum Scope {
    Container(Option<Runtime>, String),
    /// A runtime's monitor process (conmon): no container of its own.
    Monitor(Runtime),
    Other,
}

fn container_scope(token: &str, parent: Option<&str>) -> Scope {
    const MONITORS: [(&str, Runtime); 2] = [
        ("crio-conmon-", Runtime::Crio),
        ("libpod-conmon-", Runtime::Podman),
    ];
    const PREFIXES: [(&str, Runtime); 4] = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ];
    let stem = token.strip_suffix(".scope").unwrap_or(token);
    for (prefix, runtime) in MONITORS {
        if stem.strip_prefix(prefix).and_then(container_id).is_some() {
            return Scope::Monitor(runtime);
        }
    }
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix).and_then(container_id) {
            return Scope::Container(Some(runtime), id);
        }
    }
    // A bare id: Docker's cgroupfs layout says so by its parent; under the kubelet's cgroupfs
    // layout containerd and dockershim look alike, so the runtime stays unknown.
    match container_id(token) {
        Some(id) => {
            let runtime = (parent == Some("docker")).then_some(Runtime::Docker);
            Scope::Container(runtime, id)
        }
        None => Scope::Other,
    }
}

fn container_id(s: &str) -> Option<String> {
    (s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ids and UIDs below are taken from real nodes' cgroup paths quoted in public issues and
    // tests (cri-o, runc, containerd/nri, Pixie, NeuVector, dd-trace-java); STATIC_UID only has
    // the shape of the kubelet's static-pod UID (hex md5 of the manifest).
    const CTRD_ID: &str = "d7dfb4a21fe1703a8537e60d5af248af729315d187b24a538102d14874c8117d";
    const CRIO_ID: &str = "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c";
    const DOCKER_ID: &str = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d";
    const BARE_ID: &str = "01aa0bfe91e8a58da5f1f4db469fa999fe9263c702111e611445cde2b9cb0c1a";
    const UID_A: &str = "1e597579-417e-482f-bf65-5fe170c3aebd";
    const UID_B: &str = "a5c1f8d5-1919-434d-add7-4afaafdaef89";
    const UID_C: &str = "8dbc5577-d0e2-4706-8787-57d52c03ddf2";
    const STATIC_UID: &str = "0c1b5e8c1c3a1e1ee5c9b0f1bd3d0e2a";

    struct Case {
        name: &'static str,
        content: String,
        runtime: Option<Runtime>,
        id: Option<&'static str>,
        uid: Option<&'static str>,
        qos: Option<Qos>,
    }

    fn us(uid: &str) -> String {
        uid.replace('-', "_")
    }

    /// A cgroup v1 file: every hierarchy shows `path`, plus an unrelated one at `/`.
    fn v1(path: &str) -> String {
        format!(
            "12:pids:{path}\n11:files:/\n9:memory:{path}\n8:cpu,cpuacct:{path}\n\
             6:devices:{path}\n1:name=systemd:{path}\n"
        )
    }

    fn cases() -> Vec<Case> {
        use Qos::*;
        use Runtime::*;
        let c = |name, content: String, runtime, id, uid, qos| Case {
            name,
            content,
            runtime,
            id,
            uid,
            qos,
        };
        vec![
            c(
                "v2 systemd burstable containerd",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
                     cri-containerd-{CTRD_ID}.scope\n",
                    us(UID_A)
                ),
                Some(Containerd),
                Some(CTRD_ID),
                Some(UID_A),
                Some(Burstable),
            ),
            c(
                "v1 systemd burstable cri-o (multi-line)",
                v1(&format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
                     crio-{CRIO_ID}.scope",
                    us(UID_B)
                )),
                Some(Crio),
                Some(CRIO_ID),
                Some(UID_B),
                Some(Burstable),
            ),
            c(
                "v2 systemd besteffort cri-o",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
                     crio-{CRIO_ID}.scope\n",
                    us(UID_B)
                ),
                Some(Crio),
                Some(CRIO_ID),
                Some(UID_B),
                Some(BestEffort),
            ),
            c(
                "v1 systemd guaranteed docker (no QoS slice)",
                v1(&format!(
                    "/kubepods.slice/kubepods-pod{}.slice/docker-{DOCKER_ID}.scope",
                    us(UID_C)
                )),
                Some(Docker),
                Some(DOCKER_ID),
                Some(UID_C),
                Some(Guaranteed),
            ),
            c(
                "v2 systemd guaranteed containerd",
                format!(
                    "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CTRD_ID}.scope\n",
                    us(UID_C)
                ),
                Some(Containerd),
                Some(CTRD_ID),
                Some(UID_C),
                Some(Guaranteed),
            ),
            c(
                "kind: kubelet.slice root",
                format!(
                    "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                     kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{CTRD_ID}.scope\n",
                    us(UID_A)
                ),
                Some(Containerd),
                Some(CTRD_ID),
                Some(UID_A),
                Some(BestEffort),
            ),
            c(
                "crun subgroup below the container scope",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
                     crio-{CRIO_ID}.scope/container\n",
                    us(UID_B)
                ),
                Some(Crio),
                Some(CRIO_ID),
                Some(UID_B),
                Some(Burstable),
            ),
            c(
                "crio-conmon in the pod slice is not the container",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
                     crio-conmon-{CRIO_ID}.scope\n",
                    us(UID_B)
                ),
                Some(Crio),
                None,
                Some(UID_B),
                Some(Burstable),
            ),
            c(
                "crio-conmon in system.slice",
                format!("0::/system.slice/crio-conmon-{CRIO_ID}.scope\n"),
                Some(Crio),
                None,
                None,
                None,
            ),
            c(
                "v1 cgroupfs burstable (GKE)",
                v1(&format!("/kubepods/burstable/pod{UID_A}/{BARE_ID}")),
                None,
                Some(BARE_ID),
                Some(UID_A),
                Some(Burstable),
            ),
            c(
                "v1 cgroupfs besteffort",
                v1(&format!("/kubepods/besteffort/pod{UID_B}/{BARE_ID}")),
                None,
                Some(BARE_ID),
                Some(UID_B),
                Some(BestEffort),
            ),
            c(
                "v2 cgroupfs guaranteed",
                format!("0::/kubepods/pod{UID_C}/{BARE_ID}\n"),
                None,
                Some(BARE_ID),
                Some(UID_C),
                Some(Guaranteed),
            ),
            c(
                "cgroupfs cri-o prefix",
                format!("0::/kubepods/burstable/pod{UID_A}/crio-{CRIO_ID}\n"),
                Some(Crio),
                Some(CRIO_ID),
                Some(UID_A),
                Some(Burstable),
            ),
            c(
                "containerd slice:prefix:id form under containerd.service",
                v1(&format!(
                    "/system.slice/containerd.service/kubepods-besteffort-pod{}.slice:\
                     cri-containerd:{CTRD_ID}",
                    us(UID_A)
                )),
                Some(Containerd),
                Some(CTRD_ID),
                Some(UID_A),
                Some(BestEffort),
            ),
            c(
                "static pod: 32-hex UID",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/\
                     cri-containerd-{CTRD_ID}.scope\n"
                ),
                Some(Containerd),
                Some(CTRD_ID),
                Some(STATIC_UID),
                Some(Burstable),
            ),
            c(
                "plain docker cgroupfs v1",
                v1(&format!("/docker/{DOCKER_ID}")),
                Some(Docker),
                Some(DOCKER_ID),
                None,
                None,
            ),
            c(
                "plain docker systemd v1",
                v1(&format!("/system.slice/docker-{DOCKER_ID}.scope")),
                Some(Docker),
                Some(DOCKER_ID),
                None,
                None,
            ),
            c(
                "docker in docker: the outer container",
                format!("0::/docker/{DOCKER_ID}/docker/{BARE_ID}\n"),
                Some(Docker),
                Some(DOCKER_ID),
                None,
                None,
            ),
            c(
                "podman with crun",
                format!("0::/machine.slice/libpod-{DOCKER_ID}.scope/container\n"),
                Some(Podman),
                Some(DOCKER_ID),
                None,
                None,
            ),
            c(
                "podman conmon",
                format!("0::/machine.slice/libpod-conmon-{DOCKER_ID}.scope\n"),
                Some(Podman),
                None,
                None,
                None,
            ),
            c(
                "relative path from the agent's cgroup namespace (systemd)",
                format!(
                    "0::/../../kubepods-besteffort-pod{}.slice/cri-containerd-{CTRD_ID}.scope\n",
                    us(UID_A)
                ),
                Some(Containerd),
                Some(CTRD_ID),
                Some(UID_A),
                Some(BestEffort),
            ),
            c(
                "relative path from the agent's cgroup namespace (cgroupfs)",
                format!("0::/../../pod{UID_C}/{BARE_ID}\n"),
                None,
                Some(BARE_ID),
                Some(UID_C),
                None,
            ),
            c(
                "hybrid host: empty v2 line, kubepods in v1",
                format!(
                    "{}0::/\n",
                    v1(&format!("/kubepods/besteffort/pod{UID_B}/{BARE_ID}"))
                ),
                None,
                Some(BARE_ID),
                Some(UID_B),
                Some(BestEffort),
            ),
            c(
                "process in the pod slice itself",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice\n",
                    us(UID_A)
                ),
                None,
                None,
                Some(UID_A),
                Some(Burstable),
            ),
            c(
                "user session",
                "0::/user.slice/user-1000.slice/session-3.scope\n".into(),
                None,
                None,
                None,
                None,
            ),
            c(
                "systemd itself",
                "0::/init.scope\n".into(),
                None,
                None,
                None,
                None,
            ),
            c(
                "runtime daemon",
                "0::/system.slice/containerd.service\n".into(),
                None,
                None,
                None,
                None,
            ),
            c(
                "inside a container's own cgroup namespace",
                "0::/\n".into(),
                None,
                None,
                None,
                None,
            ),
            c(
                "QoS slice without a pod",
                "0::/kubepods.slice/kubepods-burstable.slice\n".into(),
                None,
                None,
                None,
                None,
            ),
            c(
                "malformed: short id, bad uid, junk lines",
                "junk\n\n::\n0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnot_a_uid.slice/\
                 cri-containerd-abc123.scope\n"
                    .into(),
                None,
                None,
                None,
                None,
            ),
            c("empty file (process gone)", String::new(), None, None, None, None),
        ]
    }

    #[test]
    fn table() {
        let cases = cases();
        assert!(cases.len() >= 15);
        for case in cases {
            let got = parse(&case.content);
            let want = ContainerRef {
                runtime: case.runtime,
                container_id: case.id.map(String::from),
                pod_uid: case.uid.map(String::from),
                qos: case.qos,
            };
            assert_eq!(got, want, "case {:?}: {:?}", case.name, case.content);
        }
    }

    #[test]
    fn uppercase_and_underscored_ids_are_normalized() {
        let r = parse_path(&format!(
            "/kubepods/pod{}/{}",
            UID_A.to_uppercase(),
            CTRD_ID.to_uppercase()
        ));
        assert_eq!(r.pod_uid.as_deref(), Some(UID_A));
        assert_eq!(r.container_id.as_deref(), Some(CTRD_ID));
    }

    #[test]
    fn non_utf8_and_missing_files() {
        let dir = std::env::temp_dir().join(format!("allocwatch-cgroup-{}", std::process::id()));
        let pid_dir = dir.join("42");
        std::fs::create_dir_all(&pid_dir).unwrap();
        let mut bytes = format!("0::/docker/{DOCKER_ID}/\u{0}").into_bytes();
        bytes.extend_from_slice(&[0xff, 0xfe, b'\n']);
        std::fs::write(pid_dir.join("cgroup"), bytes).unwrap();
        let r = read(&dir, 42).unwrap();
        assert_eq!(r.container_id.as_deref(), Some(DOCKER_ID));
        let err = read(&dir, 43).unwrap_err();
        let CgroupError::Read { source, .. } = &err;
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_own_cgroup() {
        // Whatever this machine is, its own entry must parse without error.
        let me = std::process::id();
        read(Path::new("/proc"), me).unwrap();
    }
}
