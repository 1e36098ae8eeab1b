//! Medians, ratios, and the table, JSON and SVG made from them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// One measured value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub transport: String,
    pub metric: String,
    pub imp: String,
    pub stat: String,
    pub value: f64,
    pub unit: String,
}

impl Sample {
    pub fn new(t: &str, metric: &str, imp: &str, stat: &str, value: f64, unit: &str) -> Self {
        Self {
            transport: t.into(),
            metric: metric.into(),
            imp: imp.into(),
            stat: stat.into(),
            value,
            unit: unit.into(),
        }
    }

    /// One line of a child process's report (see [`Self::from_line`]).
    pub fn line(&self) -> String {
        let Self {
            transport,
            metric,
            imp,
            stat,
            value,
            unit,
        } = self;
        format!("{transport} {metric} {imp} {stat} {value} {unit}")
    }

    /// A sample from a line [`Self::line`] wrote; `None` for any other line.
    pub fn from_line(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [t, m, i, st, v, u] = f[..] else {
            return None;
        };
        Some(Self::new(t, m, i, st, v.parse().ok()?, u))
    }
}

/// Round-trip times.
pub struct Latencies(pub Vec<Duration>);

impl Latencies {
    pub fn samples(mut self, t: &str, metric: &str, imp: &str) -> Vec<Sample> {
        self.0.sort();
        let q = |p: f64| {
            let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
            self.0
                .get(i)
                .map(|d| d.as_secs_f64() * 1e6)
                .unwrap_or(f64::NAN)
        };
        vec![
            Sample::new(t, metric, imp, "p50", q(0.5), "us"),
            Sample::new(t, metric, imp, "p99", q(0.99), "us"),
        ]
    }
}

/// A rate: `amount` per second.
pub struct Rate {
    value: f64,
    unit: &'static str,
}

impl Rate {
    pub fn new(amount: f64, elapsed: Duration, unit: &'static str) -> Self {
        Self {
            value: amount / elapsed.as_secs_f64().max(1e-9),
            unit,
        }
    }

    pub fn sample(self, t: &str, metric: &str, imp: &str) -> Sample {
        Sample::new(t, metric, imp, "rate", self.value, self.unit)
    }
}

type Key = (String, String, String, String);

/// Medians over rounds, keyed by (transport, metric, impl, stat).
pub struct Table {
    medians: BTreeMap<Key, (f64, String)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// A target: `courier / base` must be at most (or at least) `bound`.
struct Target {
    transport_any: bool,
    metric: &'static str,
    stat: &'static str,
    base: &'static str,
    bound: f64,
    at_most: bool,
    what: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        transport_any: true,
        metric: "rtt",
        stat: "p50",
        base: "raw",
        bound: 1.5,
        at_most: true,
        what: "round trip vs raw",
    },
    Target {
        transport_any: true,
        metric: "oneway",
        stat: "rate",
        base: "raw+cbor",
        bound: 0.5,
        at_most: false,
        what: "one-way rate vs raw+cbor",
    },
    Target {
        transport_any: true,
        metric: "1mib",
        stat: "rate",
        base: "raw",
        bound: 0.7,
        at_most: false,
        what: "1 MiB bandwidth vs raw",
    },
    Target {
        transport_any: true,
        metric: "local",
        stat: "rate",
        base: "actix",
        bound: 1.0 / 1.2,
        at_most: false,
        what: "local reference vs actix Addr::send (rate)",
    },
];

impl Table {
    pub fn new(samples: Vec<Sample>) -> Self {
        let mut groups: BTreeMap<Key, (Vec<f64>, String)> = BTreeMap::new();
        for s in samples {
            let e = groups
                .entry((s.transport, s.metric, s.imp, s.stat))
                .or_insert((Vec::new(), s.unit));
            e.0.push(s.value);
        }
        Self {
            medians: groups
                .into_iter()
                .map(|(k, (v, u))| (k, (median(v), u)))
                .collect(),
        }
    }

    fn get(&self, t: &str, m: &str, i: &str, s: &str) -> Option<f64> {
        self.medians
            .get(&(t.into(), m.into(), i.into(), s.into()))
            .map(|v| v.0)
    }

    fn ratios(&self) -> Vec<(String, String, f64, f64, bool, &'static str)> {
        let mut out = Vec::new();
        let transports: Vec<String> = {
            let mut v: Vec<String> = self.medians.keys().map(|k| k.0.clone()).collect();
            v.dedup();
            v
        };
        for tg in TARGETS {
            let _ = tg.transport_any;
            for t in &transports {
                if let (Some(c), Some(b)) = (
                    self.get(t, tg.metric, "courier", tg.stat),
                    self.get(t, tg.metric, tg.base, tg.stat),
                ) {
                    let r = c / b;
                    let ok = if tg.at_most {
                        r <= tg.bound
                    } else {
                        r >= tg.bound
                    };
                    out.push((
                        t.clone(),
                        tg.what.to_owned(),
                        r,
                        tg.bound,
                        ok,
                        if tg.at_most { "<=" } else { ">=" },
                    ));
                }
            }
        }
        // Also, reported without a target: (metric, impl, baseline, what).
        const REPORTED: &[(&str, &str, &str, &str)] = &[
            (
                "1mib",
                "courier+bytes",
                "raw",
                "1 MiB in CBOR (Bytes field) vs raw (reported)",
            ),
            (
                "oneway",
                "courier",
                "raw",
                "one-way rate vs raw bytes (reported)",
            ),
        ];
        for (metric, imp, base, what) in REPORTED {
            for t in &transports {
                if let (Some(c), Some(b)) = (
                    self.get(t, metric, imp, "rate"),
                    self.get(t, metric, base, "rate"),
                ) {
                    out.push((t.clone(), (*what).into(), c / b, 0.0, true, "  "));
                }
            }
        }
        out
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n{:<7} {:<10} {:<13} {:<17} {:>14} unit",
            "where", "metric", "impl", "stat", "median"
        );
        for ((t, m, i, st), (v, u)) in &self.medians {
            let _ = writeln!(s, "{t:<7} {m:<10} {i:<13} {st:<17} {v:>14.2} {u}");
        }
        let _ = writeln!(s, "\nratios (courier / baseline, medians):");
        for (t, what, r, bound, ok, op) in self.ratios() {
            if op == "  " {
                let _ = writeln!(s, "  {t:<6} {what:<45} {r:>6.2}");
            } else {
                let _ = writeln!(
                    s,
                    "  {t:<6} {what:<45} {r:>6.2}  target {op} {bound:.2}  {}",
                    if ok { "met" } else { "MISSED" }
                );
            }
        }
        s
    }

    pub fn json(&self) -> String {
        let mut s = String::from("{\n  \"medians\": [\n");
        let n = self.medians.len();
        for (k, ((t, m, i, st), (v, u))) in self.medians.iter().enumerate() {
            let _ = writeln!(
                s,
                "    {{\"transport\": \"{t}\", \"metric\": \"{m}\", \"impl\": \"{i}\", \"stat\": \"{st}\", \"value\": {v:.3}, \"unit\": \"{u}\"}}{}",
                if k + 1 < n { "," } else { "" }
            );
        }
        s.push_str("  ],\n  \"ratios\": [\n");
        let r = self.ratios();
        let n = r.len();
        for (k, (t, what, ratio, bound, ok, op)) in r.iter().enumerate() {
            let _ = writeln!(
                s,
                "    {{\"transport\": \"{t}\", \"what\": \"{what}\", \"ratio\": {ratio:.3}, \"target\": \"{} {bound:.2}\", \"met\": {ok}}}{}",
                op.trim(),
                if k + 1 < n { "," } else { "" }
            );
        }
        s.push_str("  ]\n}\n");
        s
    }

    /// Two bar charts: round-trip p50 (µs) and one-way rate, per transport
    /// and implementation.
    pub fn svg(&self) -> String {
        let charts = [
            ("rtt", "p50", "round trip p50 (µs), lower is better"),
            (
                "oneway",
                "rate",
                "one-way 64 B messages (msg/s), higher is better",
            ),
        ];
        let imps = ["raw", "raw+cbor", "courier"];
        let colors = ["#888888", "#4a90d9", "#d9534f"];
        let transports = ["tcp", "unix", "fd", "quic"];
        let (w, h) = (720, 280);
        let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n", h * charts.len());
        for (ci, (metric, stat, title)) in charts.iter().enumerate() {
            let y0 = ci * h;
            let max = transports
                .iter()
                .flat_map(|t| {
                    imps.iter()
                        .filter_map(move |i| self.get(t, metric, i, stat))
                })
                .fold(0.0f64, f64::max)
                .max(1e-9);
            let _ = writeln!(
                s,
                "<text x=\"10\" y=\"{}\" font-size=\"14\">{title}</text>",
                y0 + 20
            );
            for (ti, t) in transports.iter().enumerate() {
                let gx = 60 + ti * 160;
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{}\">{t}</text>",
                    gx + 40,
                    y0 + h - 10
                );
                for (ii, imp) in imps.iter().enumerate() {
                    let Some(v) = self.get(t, metric, imp, stat) else {
                        continue;
                    };
                    let bh = (v / max * 200.0) as usize;
                    let x = gx + ii * 40;
                    let y = y0 + 240 - bh;
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x}\" y=\"{y}\" width=\"34\" height=\"{bh}\" fill=\"{}\"/>",
                        colors[ii]
                    );
                    let _ = writeln!(
                        s,
                        "<text x=\"{x}\" y=\"{}\" font-size=\"9\">{}</text>",
                        y.saturating_sub(3),
                        fmt_short(v)
                    );
                }
            }
            for (ii, imp) in imps.iter().enumerate() {
                let _ = writeln!(s, "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{imp}</text>", 420 + ii * 90, y0 + 10, colors[ii], 434 + ii * 90, y0 + 20);
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

fn fmt_short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}
