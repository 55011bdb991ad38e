//! A strict reader of the Prometheus text exposition format (0.0.4), for the soak and the
//! integration tests: every sample line is read or the body is refused with the line's number.
//!
//! Why not `prometheus-parse`: it reads labels with the regex `\{[^}]+\}` and splits them on
//! `,` and `=`, so a label value holding `}`, `,` or `=` (a Rust `{{closure}}` frame, a C++
//! signature in a `site` label) silently drops or garbles the line. The tests count series and
//! sum values: a reader that skips lines makes them lie. Histogram buckets are grouped as
//! prometheus-parse does (one sample per series, `le` taken out of the labels; `_sum` and
//! `_count` stay samples of their own).

#![allow(
    dead_code,
    reason = "shared by the soak, the integration tests and the agent's unit tests, each using \
              a part"
)]

use std::collections::{BTreeMap, HashMap, HashSet};

/// One series (a histogram's buckets together).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub metric: String,
    pub labels: Labels,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Counter(f64),
    Gauge(f64),
    Untyped(f64),
    Histogram(Vec<HistogramCount>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistogramCount {
    pub less_than: f64,
    pub count: f64,
}

/// A series' labels, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

/// A parsed body.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// `# HELP` text by family.
    pub docs: HashMap<String, String>,
}

/// Why a body was refused.
#[derive(Debug, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for ParseError {}

#[derive(Clone, Copy, PartialEq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
    Untyped,
}

impl Scrape {
    pub fn parse(body: &str) -> Result<Self, ParseError> {
        let mut types: HashMap<String, Type> = HashMap::new();
        let mut docs = HashMap::new();
        let mut samples = Vec::new();
        // Histogram series by (family, labels without `le`): index into `samples`.
        let mut hist: HashMap<(String, Labels), usize> = HashMap::new();
        let mut seen: HashSet<(String, Labels)> = HashSet::new();
        for (i, raw) in body.lines().enumerate() {
            let err = |what: String| ParseError { line: i + 1, what };
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("TYPE"), Some(name), Some(t)) => {
                        let t = match t.trim() {
                            "counter" => Type::Counter,
                            "gauge" => Type::Gauge,
                            "histogram" => Type::Histogram,
                            "untyped" => Type::Untyped,
                            other => return Err(err(format!("unsupported type {other:?}"))),
                        };
                        if types.insert(name.to_owned(), t).is_some() {
                            return Err(err(format!("second TYPE line for {name}")));
                        }
                    }
                    (Some("HELP"), Some(name), doc) => {
                        docs.insert(name.to_owned(), doc.unwrap_or_default().to_owned());
                    }
                    _ => {}
                }
                continue;
            }
            let (name, labels, value) = sample_line(line).map_err(err)?;
            if !seen.insert((name.clone(), labels.clone())) {
                return Err(err(format!("duplicate series {name}{{{labels:?}}}")));
            }
            let family_of = |suffix: &str| {
                name.strip_suffix(suffix)
                    .filter(|f| types.get(*f) == Some(&Type::Histogram))
            };
            if let Some(family) = family_of("_bucket") {
                let mut labels = labels;
                let le = labels
                    .0
                    .remove("le")
                    .ok_or_else(|| err(format!("{name} without an le label")))?;
                let less_than = number(&le).map_err(err)?;
                let at = *hist
                    .entry((family.to_owned(), labels.clone()))
                    .or_insert_with(|| {
                        samples.push(Sample {
                            metric: family.to_owned(),
                            labels,
                            value: Value::Histogram(Vec::new()),
                        });
                        samples.len() - 1
                    });
                if let Value::Histogram(b) = &mut samples[at].value {
                    b.push(HistogramCount {
                        less_than,
                        count: value,
                    });
                }
                continue;
            }
            let value = if family_of("_sum").or(family_of("_count")).is_some() {
                Value::Untyped(value)
            } else {
                match types.get(&name) {
                    Some(Type::Counter) => Value::Counter(value),
                    Some(Type::Gauge) => Value::Gauge(value),
                    Some(Type::Histogram) => {
                        return Err(err(format!("{name} is a histogram: a bare sample")));
                    }
                    Some(Type::Untyped) | None => Value::Untyped(value),
                }
            };
            samples.push(Sample {
                metric: name,
                labels,
                value,
            });
        }
        Ok(Self { samples, docs })
    }
}

/// `name{labels} value [timestamp]`.
fn sample_line(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("no metric name in {line:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = label_set(after, &mut labels)?;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("{name}: no value"))
        .and_then(number)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("{name}: bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("{name}: trailing text after the value"));
    }
    Ok((name.to_owned(), Labels(labels), value))
}

/// Reads `k="v",…}` (the opening brace already taken); returns what follows the `}`.
fn label_set<'a>(mut s: &'a str, out: &mut BTreeMap<String, String>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        let eq = s.find('=').ok_or("a label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label {key}: value not quoted"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {key}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("label {key}: bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if out.insert(key.to_owned(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err(format!("after label {key}: expected ',' or '}}'"));
        }
    }
}

/// A sample value as Go's `strconv.ParseFloat` reads it (`+Inf`, `-Inf`, `NaN`).
fn number(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad number {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_label_values_with_braces_commas_equals_and_escapes() {
        let body = "# TYPE s counter\n\
            s{site=\"f::{{closure}} ← g(a, b=c)\",kind=\"malloc\"} 3\n\
            s{site=\"q\\\"\\\\\\n\",kind=\"free\",} 4 1700000000000\n";
        let scrape = Scrape::parse(body).expect("parses");
        assert_eq!(scrape.samples.len(), 2);
        let a = &scrape.samples[0];
        assert_eq!(a.labels.get("site"), Some("f::{{closure}} ← g(a, b=c)"));
        assert_eq!(a.labels.get("kind"), Some("malloc"));
        assert_eq!(a.value, Value::Counter(3.0));
        assert_eq!(scrape.samples[1].labels.get("site"), Some("q\"\\\n"));
    }

    #[test]
    fn groups_histogram_buckets_and_keeps_sum_and_count() {
        let body = "# TYPE h histogram\n\
            h_bucket{a=\"x\",le=\"1\"} 1\nh_bucket{a=\"x\",le=\"+Inf\"} 2\n\
            h_sum{a=\"x\"} 5\nh_count{a=\"x\"} 2\n";
        let s = Scrape::parse(body).expect("parses").samples;
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].metric, "h");
        assert_eq!(
            s[0].value,
            Value::Histogram(vec![
                HistogramCount {
                    less_than: 1.0,
                    count: 1.0
                },
                HistogramCount {
                    less_than: f64::INFINITY,
                    count: 2.0
                }
            ])
        );
        assert_eq!(
            (s[1].metric.as_str(), &s[1].value),
            ("h_sum", &Value::Untyped(5.0))
        );
        assert_eq!(s[2].labels.get("a"), Some("x"));
    }

    #[test]
    fn refuses_what_it_cannot_read_with_the_line() {
        for (body, line) in [
            ("a{b=\"c} 1\n", 1),
            ("# TYPE a gauge\na{b=c} 1\n", 2),
            ("a 1\na 2\n", 2),
            ("a{b=\"\\x\"} 1\n", 1),
            ("a one\n", 1),
            ("a{b=\"1\",b=\"2\"} 1\n", 1),
        ] {
            let e = Scrape::parse(body).expect_err(body);
            assert_eq!(e.line, line, "{body}: {e}");
        }
    }
}
