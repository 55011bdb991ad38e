//! Kubernetes identity of a traced process: container and pod from its cgroup (`cgroup`), and
//! the names the API gives them (`pods`). Pure parsing and lookups; the API watch that fills the
//! cache lives with the daemon.

pub mod cgroup;
pub mod pods;
pub mod watch;
