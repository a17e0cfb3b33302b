//! A Prometheus histogram read from a `/metrics` text page, the difference
//! of two scrapes, and its quantiles computed the way Prometheus'
//! `histogram_quantile` does (linear interpolation inside the bucket that
//! holds the rank; the lowest bucket starts at 0; a rank in the `+Inf`
//! bucket gives the highest finite bound).

/// Cumulative bucket counts of one histogram (all series matching a label
/// filter, summed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// (upper bound `le`, cumulative count), sorted by bound; `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
    /// `_count`.
    pub count: f64,
    /// `_sum` (seconds for a duration).
    pub sum: f64,
}

/// The value of label `name` in a `{a="x",b="y"}` label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!("{name}=\"");
    let start = labels
        .match_indices(&needle)
        .find(|(i, _)| *i == 0 || matches!(labels.as_bytes()[i - 1], b'{' | b',' | b' '))?
        .0
        + needle.len();
    let rest = &labels[start..];
    rest.find('"').map(|end| &rest[..end])
}

/// The histogram `name` in `text`, summed over the series whose labels
/// include every `(label, value)` of `filter`.
pub fn parse(text: &str, name: &str, filter: &[(&str, &str)]) -> Histogram {
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    let mut h = Histogram::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (suffix, after) = match rest.find(['{', ' ']) {
            Some(i) => rest.split_at(i),
            None => continue,
        };
        let (labels, value) = match after.strip_prefix('{') {
            Some(l) => match l.split_once('}') {
                Some((labels, v)) => (labels, v),
                None => continue,
            },
            None => ("", after),
        };
        if !filter
            .iter()
            .all(|(k, v)| label(labels, k).is_some_and(|x| x == *v))
        {
            continue;
        }
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        match suffix {
            "_bucket" => {
                let Some(le) = label(labels, "le").and_then(|l| match l {
                    "+Inf" => Some(f64::INFINITY),
                    l => l.parse::<f64>().ok(),
                }) else {
                    continue;
                };
                match by_le.iter_mut().find(|(b, _)| *b == le) {
                    Some(e) => e.1 += value,
                    None => by_le.push((le, value)),
                }
            }
            "_count" => h.count += value,
            "_sum" => h.sum += value,
            _ => {}
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    h.buckets = by_le;
    h
}

impl Histogram {
    /// `self - before`, bucket by bucket (buckets missing in `before` count 0).
    pub fn since(&self, before: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| {
                    let b = before
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, c)| *c);
                    (*le, (c - b).max(0.0))
                })
                .collect(),
            count: (self.count - before.count).max(0.0),
            sum: (self.sum - before.sum).max(0.0),
        }
    }

    /// Observations (the `+Inf` bucket).
    pub fn total(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, c)| *c)
    }

    /// The `q` quantile (0..=1) as `histogram_quantile` computes it; None
    /// without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total <= 0.0 || self.buckets.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut prev_le = 0.0;
        let mut prev_count = 0.0;
        for (i, (le, c)) in self.buckets.iter().enumerate() {
            if *c >= rank {
                if le.is_infinite() {
                    // Prometheus: the highest finite bound.
                    return Some(if i == 0 { 0.0 } else { prev_le });
                }
                if i == 0 && *le <= 0.0 {
                    return Some(*le);
                }
                let in_bucket = c - prev_count;
                if in_bucket <= 0.0 {
                    return Some(*le);
                }
                return Some(prev_le + (le - prev_le) * (rank - prev_count) / in_bucket);
            }
            prev_le = *le;
            prev_count = *c;
        }
        Some(prev_le)
    }

    /// The lowest finite bucket bound above 0 (what a quantile below it
    /// cannot resolve).
    pub fn first_bound(&self) -> Option<f64> {
        self.buckets
            .iter()
            .map(|(le, _)| *le)
            .find(|le| *le > 0.0 && le.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP x_seconds a\n# TYPE x_seconds histogram\n\
x_seconds_bucket{trigger=\"endpointslice\",le=\"0.1\"} 2\n\
x_seconds_bucket{trigger=\"endpointslice\",le=\"0.2\"} 6\n\
x_seconds_bucket{trigger=\"endpointslice\",le=\"+Inf\"} 10\n\
x_seconds_sum{trigger=\"endpointslice\"} 3.5\n\
x_seconds_count{trigger=\"endpointslice\"} 10\n\
x_seconds_bucket{trigger=\"service\",le=\"0.1\"} 100\n\
x_seconds_bucket{trigger=\"service\",le=\"0.2\"} 100\n\
x_seconds_bucket{trigger=\"service\",le=\"+Inf\"} 100\n\
x_seconds_other 7\n";

    #[test]
    fn parses_the_filtered_series() {
        let h = parse(PAGE, "x_seconds", &[("trigger", "endpointslice")]);
        assert_eq!(
            h.buckets,
            vec![(0.1, 2.0), (0.2, 6.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!((h.count, h.sum), (10.0, 3.5));
        let all = parse(PAGE, "x_seconds", &[]);
        assert_eq!(all.total(), 110.0);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let h = parse(PAGE, "x_seconds", &[("trigger", "endpointslice")]);
        // rank 5 of 10: bucket (0.1, 0.2] holds ranks 2..6 → 0.1 + 0.1·3/4.
        let p50 = h.quantile(0.5).expect("p50");
        assert!((p50 - 0.175).abs() < 1e-9, "{p50}");
        // rank 1: first bucket, from 0 → 0.05.
        let p10 = h.quantile(0.1).expect("p10");
        assert!((p10 - 0.05).abs() < 1e-9, "{p10}");
        // rank 9.9: the +Inf bucket → the highest finite bound.
        assert_eq!(h.quantile(0.99), Some(0.2));
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(h.first_bound(), Some(0.1));
    }

    #[test]
    fn deltas_subtract_bucket_by_bucket() {
        let before = parse(PAGE, "x_seconds", &[("trigger", "endpointslice")]);
        let page2 = PAGE.replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 14");
        let after = parse(&page2, "x_seconds", &[("trigger", "endpointslice")]);
        let d = after.since(&before);
        assert_eq!(d.total(), 4.0);
        assert_eq!(d.quantile(0.5), Some(0.2));
    }
}
