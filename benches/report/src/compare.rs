//! How this crate stands in each case of a comparison: a section's
//! cases, the ratio of this crate's best row to the best alternative's,
//! and the verdict on it.

use crate::model::{is_floor, is_ours, Measurement};
use crate::prose::Section;

/// How this crate stands in one case: its best row over the best
/// alternative.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Ahead,
    OnPar,
    Behind,
    /// Outside the band, but the two medians' confidence intervals overlap.
    Unclear,
}

/// Ratios within this band of 1 are called on a par.
pub const NOISE: f64 = 0.05;

/// The verdict on a ratio, as printed (two decimals, so that the figure and
/// the word agree), given whether the two medians' intervals overlap.
pub fn verdict(ratio: f64, intervals_overlap: bool) -> Verdict {
    let shown = (ratio * 100.0).round() / 100.0;
    if shown > 1.0 - NOISE && shown < 1.0 + NOISE {
        Verdict::OnPar
    } else if intervals_overlap {
        Verdict::Unclear
    } else if shown >= 1.0 + NOISE {
        Verdict::Ahead
    } else {
        Verdict::Behind
    }
}

impl Verdict {
    /// The word the report prints for it.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Ahead => "ahead",
            Verdict::OnPar => "on a par",
            Verdict::Behind => "**behind**",
            Verdict::Unclear => "unclear",
        }
    }
}

/// One case of a section, its rows in the order measured.
pub struct Case<'a> {
    pub name: &'a str,
    pub rows: Vec<&'a Measurement>,
}

impl Case<'_> {
    fn best(&self, ours: bool) -> Option<&Measurement> {
        self.rows
            .iter()
            .copied()
            .filter(|m| m.is_ours() == ours && !is_floor(&m.implementation))
            .max_by(|a, b| a.per_second.total_cmp(&b.per_second))
    }

    /// This crate's best row over the best alternative's, and the latter.
    pub fn ratio(&self) -> Option<(f64, &Measurement)> {
        let (ours, theirs) = (self.best(true)?, self.best(false)?);
        Some((ours.per_second / theirs.per_second, theirs))
    }

    /// The ratio's verdict.
    pub fn verdict(&self) -> Option<Verdict> {
        let (ours, theirs) = (self.best(true)?, self.best(false)?);
        let overlap = ours.interval.1 >= theirs.interval.0 && theirs.interval.1 >= ours.interval.0;
        Some(verdict(ours.per_second / theirs.per_second, overlap))
    }
}

/// The cases of `section`, in the order the benchmark ids sort.
pub fn cases<'a>(section: &Section, measurements: &'a [Measurement]) -> Vec<Case<'a>> {
    let mut cases: Vec<Case<'a>> = Vec::new();
    for m in measurements {
        if !section.prefixes.iter().any(|p| m.case.starts_with(p)) {
            continue;
        }
        match cases.iter_mut().find(|c| c.name == m.case) {
            Some(case) => case.rows.push(m),
            None => cases.push(Case {
                name: &m.case,
                rows: vec![m],
            }),
        }
    }
    // Counts in numeric order, not as text ("16" after "2").
    cases.sort_by_key(|c| split_count(c.name).map(|(stem, n, _)| (stem.to_string(), n)));
    cases
}

/// `read_hit/uniform/16_thread` → (`read_hit/uniform`, 16, `thread`), and
/// as much for any last part that counts something (`1000_keys`).
pub fn split_count(case: &str) -> Option<(&str, usize, &str)> {
    let (stem, last) = case.rsplit_once('/')?;
    let (count, unit) = last.split_once('_')?;
    Some((stem, count.parse().ok()?, unit))
}

/// Implementations of a section's cases: this crate's first.
pub fn implementations<'a>(cases: &[Case<'a>]) -> Vec<&'a str> {
    let mut names: Vec<&str> = Vec::new();
    for case in cases {
        for row in &case.rows {
            if !names.contains(&row.implementation.as_str()) {
                names.push(&row.implementation);
            }
        }
    }
    names.sort_by_key(|name| !is_ours(name));
    names
}

/// A case's name for people: `read_hit/uniform/2_thread` → `uniform, 2
/// threads`, the section's prefix left out.
pub fn case_label(section: &Section, case: &str) -> String {
    // A section of one prefix names it in its title; one of several
    // (upgrade, clone_drop, ...) needs it in each label.
    let mut label = case;
    if let [prefix] = section.prefixes {
        label = case.strip_prefix(prefix).unwrap_or(case);
    }
    let label = label.trim_start_matches('/');
    let label = if label.is_empty() { case } else { label };
    label
        .split('/')
        .map(|part| match part.strip_suffix("_thread") {
            Some("1") => "1 thread".to_string(),
            Some(n) => format!("{n} threads"),
            None => part.replace('_', " "),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_measurement as m;
    use crate::prose::SECTIONS;

    #[test]
    fn verdicts_band_noise_and_intervals() {
        assert_eq!(verdict(1.2, false), Verdict::Ahead);
        assert_eq!(verdict(1.03, false), Verdict::OnPar);
        assert_eq!(verdict(0.97, false), Verdict::OnPar);
        assert_eq!(verdict(0.5, false), Verdict::Behind);
        assert_eq!(verdict(0.5, true), Verdict::Unclear);
        assert_eq!(verdict(1.03, true), Verdict::OnPar);
        // The word follows the printed figure: 0.9504 prints 0.95.
        assert_eq!(verdict(0.9504, false), Verdict::Behind);
        assert_eq!(verdict(1.0496, false), Verdict::Ahead);
        assert_eq!(verdict(1.0449, false), Verdict::OnPar);
    }

    #[test]
    fn overlapping_intervals_make_a_case_unclear() {
        let mut wide = m("churn", "weakrefs", 5e6);
        wide.interval = (1e6, 9e6);
        let rows = [wide, m("churn", "dashmap", 8e6)];
        let section = SECTIONS.iter().find(|s| s.id == "map_churn").unwrap();
        assert_eq!(cases(section, &rows)[0].verdict(), Some(Verdict::Unclear));
    }

    #[test]
    fn a_floor_is_never_the_best_alternative() {
        let rows = [
            m("read_hit/uniform/1_thread", "weakrefs", 10e6),
            m("read_hit/uniform/1_thread", "dashmap", 8e6),
            m("read_hit/uniform/1_thread", "std_hashmap_unsync", 20e6),
        ];
        let case = Case {
            name: "read_hit/uniform/1_thread",
            rows: rows.iter().collect(),
        };
        let (ratio, theirs) = case.ratio().expect("both sides");
        assert_eq!(theirs.implementation, "dashmap");
        assert!((ratio - 1.25).abs() < 1e-9);
    }

    #[test]
    fn ratio_is_best_of_ours_over_best_alternative() {
        let rows = [
            m("side_table/lookup/1_thread", "weakrefs_with", 4e6),
            m("side_table/lookup/1_thread", "weakrefs_get", 5e6),
            m("side_table/lookup/1_thread", "dashmap", 20e6),
            m("side_table/lookup/1_thread", "other", 10e6),
        ];
        let section = SECTIONS.iter().find(|s| s.id == "key_maps").unwrap();
        let cases = cases(section, &rows);
        assert_eq!(cases.len(), 1);
        let (ratio, theirs) = cases[0].ratio().unwrap();
        assert!((ratio - 0.25).abs() < 1e-9);
        assert_eq!(theirs.implementation, "dashmap");
        assert_eq!(
            implementations(&cases),
            ["weakrefs_with", "weakrefs_get", "dashmap", "other"]
        );
    }

    #[test]
    fn thread_counts_sort_as_numbers_and_read_as_words() {
        let rows = [
            m("read_hit/uniform/16_thread", "weakrefs", 1.0),
            m("read_hit/uniform/2_thread", "weakrefs", 1.0),
            m("read_hit/uniform/1_thread", "weakrefs", 1.0),
        ];
        let section = SECTIONS.iter().find(|s| s.id == "map_reads").unwrap();
        let names: Vec<_> = cases(section, &rows)
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "read_hit/uniform/1_thread",
                "read_hit/uniform/2_thread",
                "read_hit/uniform/16_thread"
            ]
        );
        assert_eq!(
            case_label(section, "read_hit/skewed/2_thread"),
            "skewed, 2 threads"
        );
        let sizes = SECTIONS.iter().find(|s| s.id == "map_read_sizes").unwrap();
        let rows = [
            m("read_hit_by_size/1000000_keys", "weakrefs", 1.0),
            m("read_hit_by_size/100000_keys", "weakrefs", 1.0),
        ];
        let names: Vec<_> = cases(sizes, &rows)
            .iter()
            .map(|c| c.name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "read_hit_by_size/100000_keys",
                "read_hit_by_size/1000000_keys"
            ]
        );
        assert_eq!(case_label(sizes, "read_hit_by_size/1000_keys"), "1000 keys");
        let churn = SECTIONS.iter().find(|s| s.id == "map_churn").unwrap();
        assert_eq!(case_label(churn, "churn"), "churn");
        let handles = SECTIONS.iter().find(|s| s.id == "handles").unwrap();
        assert_eq!(
            case_label(handles, "clone_drop/1_thread"),
            "clone drop, 1 thread"
        );
    }
}
