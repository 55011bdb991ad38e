//! Label values: the identity label pairs, and `site` labels made once per shared call chain.

use std::{collections::HashMap, sync::Arc};

use prometheus::proto::LabelPair;

use super::identity::{CallsBytes, Live, SiteKey};
use super::{MAX_SITE_LABEL, OTHER_SITE};
use crate::{
    model::{ProcessLabels, SiteSnapshot},
    report::pprof::function_name,
    symbolize::Frame,
};

/// The identity labels in output order.
pub(super) fn identity_labels(l: &ProcessLabels) -> Vec<LabelPair> {
    [
        ("namespace", &l.namespace),
        ("pod", &l.pod),
        ("container", &l.container),
        ("comm", &l.comm),
        ("exe", &l.exe),
    ]
    .into_iter()
    .map(|(n, v)| label(n, v))
    .collect()
}

pub(super) fn label(name: &str, value: &str) -> LabelPair {
    let mut lp = LabelPair::default();
    lp.set_name(name.to_string());
    lp.set_value(value.to_string());
    lp
}

/// `fn ← caller` from the innermost two frames (`(no stack)` without frames). Never equal to
/// [`OTHER_SITE`], and at most [`MAX_SITE_LABEL`] bytes.
pub fn site_label(frames: &[Frame]) -> String {
    let mut s = match frames {
        [] => "(no stack)".to_string(),
        [only] => function_name(only),
        [first, caller, ..] => format!("{} ← {}", function_name(first), function_name(caller)),
    };
    if s == OTHER_SITE {
        s.push_str(" ← ?");
    }
    if s.len() > MAX_SITE_LABEL {
        let mut cut = MAX_SITE_LABEL - '…'.len_utf8();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Site labels by call chain: the agent's chains are shared (interned), so each label is
/// made once, not once per process and scrape.
#[derive(Default)]
pub(super) struct Labels(HashMap<usize, LabelOf>);

/// A chain (weakly: the label goes when the chain does) and its label.
pub(super) type LabelOf = (std::sync::Weak<[Frame]>, Arc<str>);

impl Labels {
    pub(super) fn of(&mut self, frames: &Arc<[Frame]>) -> Arc<str> {
        let key = Arc::as_ptr(frames).cast::<Frame>() as usize;
        if let Some((weak, label)) = self.0.get(&key)
            && weak.upgrade().is_some_and(|f| Arc::ptr_eq(&f, frames))
        {
            return Arc::clone(label);
        }
        let label: Arc<str> = Arc::from(site_label(frames));
        self.0
            .insert(key, (Arc::downgrade(frames), Arc::clone(&label)));
        label
    }

    /// Drops the labels of chains nobody holds any more.
    pub(super) fn purge(&mut self) {
        self.0.retain(|_, (weak, _)| weak.strong_count() > 0);
    }
}

pub(super) fn sites_of(
    sites: &[SiteSnapshot],
    labels: &mut Labels,
) -> HashMap<SiteKey, (CallsBytes, Live)> {
    let mut out: HashMap<SiteKey, (CallsBytes, Live)> = HashMap::with_capacity(sites.len());
    for s in sites {
        // A gone process's folded sites count toward its kind under `other` (a label no
        // real site has), and never become a site of their own (see `challengers`).
        let site = if s.remainder {
            Arc::from(OTHER_SITE)
        } else {
            labels.of(&s.frames)
        };
        let key = SiteKey { kind: s.kind, site };
        let e = out.entry(key).or_default();
        e.0 = e.0.add(CallsBytes {
            calls: s.calls,
            bytes: s.bytes,
        });
        e.1 = e.1.add(Live {
            allocations: s.live_allocations,
            bytes: s.live_bytes,
        });
    }
    out
}
