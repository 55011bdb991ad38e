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

/// `fn <- caller` from the innermost two frames, the way the CLI prints a stack (`(no stack)`
/// without frames). ASCII, so that a PromQL matcher can be typed; never equal to
/// [`OTHER_SITE`], and at most [`MAX_SITE_LABEL`] bytes. Each frame is a short key
/// ([`frame_key`]): the full stack is in the pprof profiles.
pub fn site_label(frames: &[Frame]) -> String {
    let mut s = match frames {
        [] => "(no stack)".to_string(),
        [only] => frame_key(only),
        [first, caller, ..] => format!("{} <- {}", frame_key(first), frame_key(caller)),
    };
    if s == OTHER_SITE {
        s.push_str(" <- ?");
    }
    if s.len() > MAX_SITE_LABEL {
        let mut cut = MAX_SITE_LABEL - "...".len();
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// A frame as a label holds it: its function with generic arguments left out
/// (`Vec<...>::push`, `main.Map[...]`), else `module+0xoffset`; a frame known only by its
/// address is `?`, because the address differs in every process (ASLR) and would make each
/// process a series of its own.
fn frame_key(f: &Frame) -> String {
    match (&f.function, &f.module, f.offset) {
        (Some(func), _, _) => without_generic_args(func),
        (None, Some(_), Some(_)) => function_name(f),
        _ => "?".to_string(),
    }
}

/// `name` with what is inside each outermost `<…>` or `[…]` replaced by `...`: template and
/// generic arguments make names of unbounded length (and a series per instantiation). A name
/// whose brackets do not balance (`operator<`) is kept as it is.
fn without_generic_args(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut depth = 0usize;
    for c in name.chars() {
        match c {
            '<' | '[' => {
                if depth == 0 {
                    out.push(c);
                    out.push_str("...");
                }
                depth += 1;
            }
            '>' | ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push(c);
                }
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    if depth == 0 { out } else { name.to_string() }
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
        // `free` is no allocation: the site families are the allocating call sites (a
        // process's frees are `allocwatch_free_calls_total`).
        if s.kind == "free" {
            continue;
        }
        // Not named yet: counted when it is (see `SiteSnapshot::pending`).
        if s.pending {
            continue;
        }
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
