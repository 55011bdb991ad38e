//! Pod metadata from the Kubernetes API: this node's pods, listed and watched (kube's
//! watcher re-lists after errors with backoff). Only runs inside a cluster.

use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;

/// A change to the pod cache, applied by the daemon loop.
#[derive(Debug)]
pub enum PodUpdate {
    /// A pod as JSON (`v1.Pod`), added or changed.
    Upsert(serde_json::Value),
    /// A pod deleted, by UID.
    Remove(String),
}

/// Whether this process runs in a Kubernetes pod with API access (the in-cluster variables).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// Watches the pods of `node` (all pods when `None`) and sends their changes until the
/// receiver goes away. Errors are logged once per kind and retried by the watcher.
pub async fn watch_pods(node: Option<String>, tx: mpsc::Sender<PodUpdate>) {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            crate::say!("allocwatch: warning: no Kubernetes API ({e}); pod labels stay empty");
            return;
        }
    };
    let api: Api<Pod> = Api::all(client);
    let mut cfg = watcher::Config::default();
    if let Some(node) = &node {
        cfg = cfg.fields(&format!("spec.nodeName={node}"));
    }
    let stream = watcher(api, cfg).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut warned = false;
    while let Some(event) = stream.next().await {
        let update = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                serde_json::to_value(&pod).ok().map(PodUpdate::Upsert)
            }
            Ok(watcher::Event::Delete(pod)) => pod.metadata.uid.map(PodUpdate::Remove),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => {
                if !warned {
                    crate::say!("allocwatch: warning: watching pods: {e} (retrying)");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                None
            }
        };
        if let Some(u) = update
            && tx.send(u).await.is_err()
        {
            return;
        }
    }
}
