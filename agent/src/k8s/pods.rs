//! The Kubernetes metadata cache: pod UID and container id → namespace, pod and container name.
//!
//! Filled from `v1.Pod` objects as the API serves them (the daemon watches this node's pods and
//! calls [`PodCache::upsert`] / [`PodCache::remove`]); read with what the cgroup path gave
//! ([`ContainerRef`]). Only JSON here, so the cache is testable without a cluster.

use std::collections::HashMap;

use serde_json::Value;

use super::cgroup::ContainerRef;

/// Labels for one process. `container_name` is `None` when only the pod is known (the pod's
/// sandbox, CRI-O's conmon, or a container the API has not reported yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub pod: String,
    pub container_name: Option<String>,
}

/// What one `v1.Pod` contributes to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// For a static pod's mirror, the UID the kubelet uses on the node (and so in cgroup names):
    /// the `kubernetes.io/config.mirror` annotation, which differs from the mirror's own UID.
    pub node_uid: Option<String>,
    /// (container id, container name) for regular, init and ephemeral containers, current and
    /// last-terminated instances.
    pub containers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("pod object has no string field {0}")]
    MissingField(&'static str),
}

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Extracts the cache entry from a `v1.Pod`-shaped JSON value. Container statuses without a
/// usable id (waiting containers, unknown formats) are skipped, not errors: they show up in a
/// later update.
pub fn pod_info(pod: &Value) -> Result<PodInfo, PodError> {
    let field = |path: &'static str| -> Result<String, PodError> {
        let mut v = pod;
        for key in path.split('.') {
            v = v.get(key).ok_or(PodError::MissingField(path))?;
        }
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or(PodError::MissingField(path))
    };
    let uid = field("metadata.uid")?;
    let namespace = field("metadata.namespace")?;
    let name = field("metadata.name")?;
    let node_uid = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase);

    let mut containers = Vec::new();
    for list in [
        "containerStatuses",
        "initContainerStatuses",
        "ephemeralContainerStatuses",
    ] {
        let Some(statuses) = pod
            .get("status")
            .and_then(|s| s.get(list))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for status in statuses {
            let Some(cname) = status.get("name").and_then(Value::as_str) else {
                continue;
            };
            let ids = [
                status.get("containerID"),
                status.pointer("/lastState/terminated/containerID"),
            ];
            for id in ids.into_iter().flatten().filter_map(Value::as_str) {
                if let Some(id) = runtime_container_id(id) {
                    containers.push((id, cname.to_owned()));
                }
            }
        }
    }
    Ok(PodInfo {
        uid,
        namespace,
        name,
        node_uid,
        containers,
    })
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → the 64-hex id that cgroup names carry.
fn runtime_container_id(s: &str) -> Option<String> {
    let (_, id) = s.split_once("://")?;
    (id.len() == 64 && id.bytes().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

#[derive(Debug, Clone)]
struct PodEntry {
    namespace: String,
    name: String,
    node_uid: Option<String>,
    container_ids: Vec<String>,
}

/// This node's pods, indexed for lookups from cgroup identities. Holds only what the watch
/// reported last, so its size follows the pods on the node.
#[derive(Debug, Default)]
pub struct PodCache {
    pods: HashMap<String, PodEntry>,
    /// Container id → (pod UID, container name).
    containers: HashMap<String, (String, String)>,
    /// Node-side UID of a static pod → its mirror pod's UID.
    node_uids: HashMap<String, String>,
}

impl PodCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces one pod from its JSON. A replaced pod's old container ids are dropped, so
    /// restarted containers do not accumulate.
    pub fn upsert(&mut self, pod: &Value) -> Result<(), PodError> {
        self.insert(pod_info(pod)?);
        Ok(())
    }

    pub fn insert(&mut self, info: PodInfo) {
        self.remove(&info.uid);
        let mut container_ids = Vec::with_capacity(info.containers.len());
        for (id, cname) in info.containers {
            self.containers
                .insert(id.clone(), (info.uid.clone(), cname));
            container_ids.push(id);
        }
        if let Some(node_uid) = &info.node_uid {
            self.node_uids.insert(node_uid.clone(), info.uid.clone());
        }
        self.pods.insert(
            info.uid,
            PodEntry {
                namespace: info.namespace,
                name: info.name,
                node_uid: info.node_uid,
                container_ids,
            },
        );
    }

    /// Forgets a pod by its API UID (a watch `DELETED` event).
    pub fn remove(&mut self, uid: &str) {
        let Some(old) = self.pods.remove(uid) else {
            return;
        };
        for id in old.container_ids {
            // Only if still ours: an id cannot move between pods, but be exact anyway.
            if self.containers.get(&id).is_some_and(|(u, _)| u == uid) {
                self.containers.remove(&id);
            }
        }
        if let Some(node_uid) = old.node_uid {
            self.node_uids.remove(&node_uid);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Labels for a process: by container id first, then by pod UID (named by the node or by the
    /// API) with no container name.
    pub fn lookup(&self, r: &ContainerRef) -> Option<PodMeta> {
        if let Some((uid, cname)) = r
            .container_id
            .as_ref()
            .and_then(|id| self.containers.get(id))
        {
            let pod = self.pods.get(uid)?;
            return Some(PodMeta {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container_name: Some(cname.clone()),
            });
        }
        let uid = r.pod_uid.as_ref()?;
        let uid = self.node_uids.get(uid).unwrap_or(uid);
        let pod = self.pods.get(uid)?;
        Some(PodMeta {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container_name: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const APP: &str = "a7638fe3934b37419cc56bca73465a02b354ba6e98e10272542d84eb2014dd62";
    const APP_OLD: &str = "14011c7d92a9e513dfd69211da0413dbf319a5e45a02b354ba6e98e10272542d";
    const INIT: &str = "2b41fe4bb7a365960f1e7ed6c09651252b29387b44c9e14ad17e3bc392e7c640";
    const DEBUG: &str = "159757ef9efdc09be13490c8615f1402c170cdd406dad6053ebe0df2db89fcaa";
    const SIDECAR: &str = "b9055cee13e1f37ecb63030593b27f4adc43cbd6629aa7781ffdf53fbaecfa46";
    const UID: &str = "5a1d1140-a486-478c-afae-bbc975ff9c3b";

    /// Trimmed from `kubectl get pod -o json` of a running pod.
    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-7d4b9c8f5-x2x9k", "namespace": "shop", "uid": UID},
            "spec": {"nodeName": "node-1"},
            "status": {
                "phase": "Running",
                "qosClass": "Burstable",
                "initContainerStatuses": [
                    {"name": "migrate", "containerID": format!("containerd://{INIT}"),
                     "state": {"terminated": {"exitCode": 0}}}
                ],
                "containerStatuses": [
                    {"name": "app", "containerID": format!("containerd://{APP}"),
                     "restartCount": 1,
                     "lastState": {"terminated": {"containerID": format!("containerd://{APP_OLD}"),
                                                   "exitCode": 137}}},
                    {"name": "sidecar", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ],
                "ephemeralContainerStatuses": [
                    {"name": "debugger-abcde", "containerID": format!("cri-o://{DEBUG}")}
                ]
            }
        })
    }

    fn by_container(id: &str) -> ContainerRef {
        ContainerRef {
            container_id: Some(id.into()),
            ..ContainerRef::default()
        }
    }

    fn by_pod(uid: &str) -> ContainerRef {
        ContainerRef {
            pod_uid: Some(uid.into()),
            ..ContainerRef::default()
        }
    }

    fn meta(container: Option<&str>) -> Option<PodMeta> {
        Some(PodMeta {
            namespace: "shop".into(),
            pod: "web-7d4b9c8f5-x2x9k".into(),
            container_name: container.map(String::from),
        })
    }

    #[test]
    fn extracts_every_kind_of_container() {
        let info = pod_info(&pod()).unwrap();
        assert_eq!(info.uid, UID);
        assert_eq!(info.node_uid, None);
        let names: Vec<_> = info
            .containers
            .iter()
            .map(|(id, n)| (id.as_str(), n.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                (APP, "app"),
                (APP_OLD, "app"),
                (INIT, "migrate"),
                (DEBUG, "debugger-abcde"),
            ]
        );
    }

    #[test]
    fn lookups() {
        let mut cache = PodCache::new();
        cache.upsert(&pod()).unwrap();
        assert_eq!(cache.lookup(&by_container(APP)), meta(Some("app")));
        assert_eq!(cache.lookup(&by_container(INIT)), meta(Some("migrate")));
        assert_eq!(
            cache.lookup(&by_container(DEBUG)),
            meta(Some("debugger-abcde"))
        );
        // The sandbox (pause) container is in no status list: the pod is still named.
        let sandbox = ContainerRef {
            container_id: Some(SIDECAR.into()),
            pod_uid: Some(UID.into()),
            ..ContainerRef::default()
        };
        assert_eq!(cache.lookup(&sandbox), meta(None));
        assert_eq!(cache.lookup(&by_container(SIDECAR)), None);
        assert_eq!(cache.lookup(&ContainerRef::default()), None);
    }

    #[test]
    fn update_replaces_and_delete_forgets() {
        let mut cache = PodCache::new();
        cache.upsert(&pod()).unwrap();
        let mut p = pod();
        p["status"]["containerStatuses"][1]["containerID"] =
            json!(format!("containerd://{SIDECAR}"));
        p["status"]["containerStatuses"][0]
            .as_object_mut()
            .unwrap()
            .remove("lastState");
        cache.upsert(&p).unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.lookup(&by_container(SIDECAR)), meta(Some("sidecar")));
        assert_eq!(cache.lookup(&by_container(APP_OLD)), None);
        cache.remove(UID);
        assert!(cache.is_empty());
        assert_eq!(cache.lookup(&by_container(APP)), None);
        assert_eq!(cache.lookup(&by_pod(UID)), None);
        cache.remove(UID);
    }

    #[test]
    fn static_pod_found_by_node_uid() {
        let node_uid = "0c1b5e8c1c3a1e1ee5c9b0f1bd3d0e2a";
        let mut p = pod();
        p["metadata"]["annotations"] = json!({
            "kubernetes.io/config.hash": node_uid,
            "kubernetes.io/config.mirror": node_uid,
            "kubernetes.io/config.source": "file"
        });
        let mut cache = PodCache::new();
        cache.upsert(&p).unwrap();
        assert_eq!(cache.lookup(&by_pod(node_uid)), meta(None));
        assert_eq!(cache.lookup(&by_pod(UID)), meta(None));
        cache.remove(UID);
        assert_eq!(cache.lookup(&by_pod(node_uid)), None);
    }

    #[test]
    fn bad_objects_are_errors_not_panics() {
        let mut cache = PodCache::new();
        for (v, field) in [
            (json!(null), "metadata.uid"),
            (json!([1, 2]), "metadata.uid"),
            (json!({"metadata": {"uid": 7}}), "metadata.uid"),
            (
                json!({"metadata": {"uid": "u", "name": "n"}}),
                "metadata.namespace",
            ),
            (
                json!({"metadata": {"uid": "u", "namespace": "ns", "name": ""}}),
                "metadata.name",
            ),
        ] {
            assert_eq!(cache.upsert(&v), Err(PodError::MissingField(field)), "{v}");
        }
        // Odd statuses are skipped.
        let odd = json!({
            "metadata": {"uid": "u", "namespace": "ns", "name": "n"},
            "status": {"containerStatuses": [
                {"name": "a", "containerID": "containerd://short"},
                {"name": "b", "containerID": APP},
                {"containerID": format!("containerd://{APP}")},
                {"name": "c", "containerID": 5},
                "nonsense"
            ], "initContainerStatuses": {"not": "a list"}}
        });
        assert_eq!(pod_info(&odd).unwrap().containers, []);
    }
}
