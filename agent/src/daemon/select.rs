//! Which processes the daemon traces: the `select` section of the config, compiled.

use regex::Regex;

use crate::config::{ConfigError, Select};

/// What a process is matched on.
#[derive(Clone, Debug, Default)]
pub struct Candidate<'a> {
    pub comm: &'a str,
    pub exe: &'a str,
    /// Its cgroup path; `None` when it exited before the agent could read it.
    pub cgroup: Option<&'a str>,
    /// Kubernetes namespace of its pod, when known.
    pub namespace: Option<&'a str>,
}

#[derive(Debug, Default)]
struct Rules {
    comm: Vec<Regex>,
    exe: Vec<Regex>,
    cgroup: Vec<Regex>,
    namespace: Vec<Regex>,
}

impl Rules {
    fn compile(
        comm: &[String],
        exe: &[String],
        cgroup: &[String],
        namespace: &[String],
    ) -> Result<Self, ConfigError> {
        let all = |key: &str, v: &[String]| {
            v.iter()
                .map(|r| {
                    Regex::new(r).map_err(|e| ConfigError::Regex {
                        key: key.to_string(),
                        source: Box::new(e),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            comm: all("comm", comm)?,
            exe: all("exe", exe)?,
            cgroup: all("cgroup", cgroup)?,
            namespace: all("k8s_namespace", namespace)?,
        })
    }

    fn is_empty(&self) -> bool {
        self.comm.is_empty()
            && self.exe.is_empty()
            && self.cgroup.is_empty()
            && self.namespace.is_empty()
    }

    /// Whether any rule matches (a process outside pods never matches a namespace rule, one
    /// whose cgroup is unknown never matches a cgroup or namespace rule).
    fn any(&self, c: &Candidate<'_>) -> bool {
        self.comm.iter().any(|r| r.is_match(c.comm))
            || self.exe.iter().any(|r| r.is_match(c.exe))
            || c.cgroup
                .is_some_and(|cg| self.cgroup.iter().any(|r| r.is_match(cg)))
            || c.namespace
                .is_some_and(|ns| self.namespace.iter().any(|r| r.is_match(ns)))
    }
}

/// Compiled selection: empty includes select everything; excludes win.
#[derive(Debug, Default)]
pub struct Selector {
    include: Rules,
    exclude: Rules,
}

impl Selector {
    pub fn new(s: &Select) -> Result<Self, ConfigError> {
        Ok(Self {
            include: Rules::compile(&s.comm, &s.exe, &s.cgroup, &s.k8s_namespace)?,
            exclude: Rules::compile(
                &s.exclude_comm,
                &s.exclude_exe,
                &s.exclude_cgroup,
                &s.exclude_k8s_namespace,
            )?,
        })
    }

    /// Whether some process may be rejected (any rule at all).
    pub fn may_reject(&self) -> bool {
        !(self.include.is_empty() && self.exclude.is_empty())
    }

    pub fn selects(&self, c: &Candidate<'_>) -> bool {
        (self.include.is_empty() || self.include.any(c)) && !self.exclude.any(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(f: impl FnOnce(&mut Select)) -> Selector {
        let mut s = Select::default();
        f(&mut s);
        Selector::new(&s).unwrap()
    }

    fn cand<'a>(comm: &'a str, exe: &'a str, ns: Option<&'a str>) -> Candidate<'a> {
        Candidate {
            comm,
            exe,
            cgroup: Some("/kubepods.slice/x"),
            namespace: ns,
        }
    }

    #[test]
    fn empty_selects_everything_but_excludes() {
        assert!(!sel(|_| {}).may_reject());
        let s = sel(|s| s.exclude_comm = vec!["^sshd$".into()]);
        assert!(s.may_reject());
        assert!(s.selects(&cand("nginx", "/usr/sbin/nginx", None)));
        assert!(!s.selects(&cand("sshd", "/usr/sbin/sshd", None)));
    }

    #[test]
    fn includes_are_alternatives_and_namespaces_need_a_pod() {
        let s = sel(|s| {
            s.comm = vec!["^api$".into()];
            s.k8s_namespace = vec!["^prod$".into()];
        });
        assert!(s.selects(&cand("api", "/bin/api", None)));
        assert!(s.selects(&cand("worker", "/bin/w", Some("prod"))));
        assert!(!s.selects(&cand("worker", "/bin/w", Some("dev"))));
        assert!(!s.selects(&cand("worker", "/bin/w", None)));
    }

    /// A process that exited before its cgroup was read: only comm and exe can select it.
    #[test]
    fn unknown_cgroup_matches_no_cgroup_rule() {
        let s = sel(|s| {
            s.cgroup = vec![".*".into()];
            s.comm = vec!["^api$".into()];
        });
        let gone = |comm| Candidate {
            comm,
            exe: "/bin/x",
            cgroup: None,
            namespace: None,
        };
        assert!(s.selects(&cand("worker", "/bin/w", None)));
        assert!(!s.selects(&gone("worker")));
        assert!(s.selects(&gone("api")));
        let s = sel(|s| s.exclude_cgroup = vec![".*".into()]);
        assert!(!s.selects(&cand("worker", "/bin/w", None)));
        assert!(s.selects(&gone("worker")));
    }

    #[test]
    fn bad_regex_is_an_error() {
        let s = Select {
            exe: vec!["(".into()],
            ..Select::default()
        };
        assert!(Selector::new(&s).is_err());
    }
}
