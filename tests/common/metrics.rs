//! Prometheus scrapes parsed for assertions.

#![allow(dead_code)]

use std::collections::HashMap;

/// One scrape, parsed by a Prometheus text-format parser: (name, labels) → value, with a
/// histogram's sample count under `<name>_count`.
pub struct Scrape(HashMap<(String, Vec<(String, String)>), f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid exposition text");
        let mut map = HashMap::new();
        for s in parsed.samples {
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => {
                    map.insert((s.metric, labels), v);
                }
                prometheus_parse::Value::Histogram(buckets) => {
                    let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
                    map.insert((format!("{}_count", s.metric), labels), count);
                }
                prometheus_parse::Value::Summary(_) => {}
            }
        }
        Scrape(map)
    }

    /// The value of `name` with exactly these labels (0 when absent: a counter not yet born).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.0
            .get(&(name.to_string(), want))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.keys().map(|k| k.0.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The sum over every series of `name` whose labels include these.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The values of one label over every series of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        self.0
            .keys()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, l)| l.iter().find(|(k, _)| k == label).map(|(_, v)| v.clone()))
            .collect()
    }
}
