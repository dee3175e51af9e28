//! Version policies (TF Serving's `ServableVersionPolicy`) and the one function that
//! decides what should serve: [`aspired`], pure and stateless, so every trigger of
//! [`super::manager`] gets the same answer from the same facts.
//!
//! This module knows version numbers only: no files, no registry, no loading.

use std::collections::{BTreeMap, BTreeSet};

/// Which stored versions of a model should serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The newest N versions that load (a newer one that fails leaves an older serving).
    Latest(usize),
    /// Every stored version.
    All,
    /// Exactly these versions.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The policy as the config writes it: `latest = 1`, `all`, `specific = [3, 5]`.
    pub fn describe(&self) -> String {
        match self {
            VersionPolicy::Latest(n) => format!("latest = {n}"),
            VersionPolicy::All => "all".into(),
            VersionPolicy::Specific(v) => format!("specific = {v:?}"),
        }
    }

    /// From the config file: `"all"`, `{ latest = N }` or `{ specific = [..] }`.
    pub fn from_toml(v: &toml::Value) -> Result<VersionPolicy, String> {
        let bad = || {
            format!(
                "a version policy is \"all\", {{ latest = N }} or {{ specific = [1, 2] }}, not {v}"
            )
        };
        match v {
            toml::Value::String(s) if s == "all" => Ok(VersionPolicy::All),
            toml::Value::Table(t) if t.len() == 1 => match (t.get("latest"), t.get("specific")) {
                (Some(toml::Value::Integer(n)), None) if *n > 0 => {
                    Ok(VersionPolicy::Latest(*n as usize))
                }
                (None, Some(toml::Value::Array(a))) => a
                    .iter()
                    .map(|x| {
                        x.as_integer()
                            .filter(|&n| n > 0)
                            .map(|n| n as u64)
                            .ok_or_else(bad)
                    })
                    .collect::<Result<_, _>>()
                    .map(VersionPolicy::Specific),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// The `[policies]` table of the config file, typed as it is read: each entry is checked
/// there, and an error names its key (`policies.mlp: ...`).
pub fn deserialize_policies<'de, D>(d: D) -> Result<BTreeMap<String, VersionPolicy>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.iter()
        .map(|(model, v)| {
            VersionPolicy::from_toml(v)
                .map(|p| (model.clone(), p))
                .map_err(|e| serde::de::Error::custom(format!("policies.{model}: {e}")))
        })
        .collect()
}

/// The policy of each model: a default and per-model choices.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub default: VersionPolicy,
    pub per_model: BTreeMap<String, VersionPolicy>,
}

impl Policies {
    pub fn get(&self, model: &str) -> &VersionPolicy {
        self.per_model.get(model).unwrap_or(&self.default)
    }
}

/// The versions of one model that should serve, from what the source holds (`stored`),
/// the versions labels point to, and the versions that failed to load (and have not
/// changed since): a failed version is never aspired, so under `latest = N` the next
/// older one takes its place and a failed newer version never replaces a working one.
/// A labelled version serves whatever the policy says.
pub fn aspired(
    policy: &VersionPolicy,
    stored: &BTreeSet<u64>,
    labelled: &BTreeSet<u64>,
    failed: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    let loadable = stored.iter().filter(|v| !failed.contains(v)).copied();
    let mut want: BTreeSet<u64> = match policy {
        VersionPolicy::Latest(n) => loadable.rev().take(*n).collect(),
        VersionPolicy::All => loadable.collect(),
        VersionPolicy::Specific(list) => loadable.filter(|v| list.contains(v)).collect(),
    };
    want.extend(
        labelled
            .iter()
            .filter(|v| stored.contains(v) && !failed.contains(v)),
    );
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<VersionPolicy, String> {
        let v: toml::Value = toml::from_str(&format!("p = {text}")).unwrap();
        VersionPolicy::from_toml(&v["p"])
    }

    #[test]
    fn policies_parse_from_the_config_text() {
        assert_eq!(policy("\"all\""), Ok(VersionPolicy::All));
        assert_eq!(policy("{ latest = 2 }"), Ok(VersionPolicy::Latest(2)));
        assert_eq!(
            policy("{ specific = [1, 3] }"),
            Ok(VersionPolicy::Specific(vec![1, 3]))
        );
        for bad in [
            "\"newest\"",
            "{ latest = 0 }",
            "{ latest = 1, specific = [1] }",
            "{ specific = [-1] }",
        ] {
            assert!(policy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aspired_versions_as_a_table() {
        use VersionPolicy::*;
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        // (policy, stored, labelled, failed) -> aspired
        type Row<'a> = (VersionPolicy, &'a [u64], &'a [u64], &'a [u64], &'a [u64]);
        let table: &[Row] = &[
            (Latest(1), &[1, 2, 3], &[], &[], &[3]),
            (Latest(2), &[1, 2, 3], &[], &[], &[2, 3]),
            (Latest(5), &[1, 2], &[], &[], &[1, 2]),
            (Latest(1), &[], &[], &[], &[]),
            // A failed newer version never replaces a working one: the next older serves.
            (Latest(1), &[1, 2, 3], &[], &[3], &[2]),
            (Latest(2), &[1, 2, 3], &[], &[3], &[1, 2]),
            (Latest(1), &[1, 2, 3], &[], &[2, 3], &[1]),
            (Latest(1), &[1], &[], &[1], &[]),
            (All, &[1, 2, 3], &[], &[], &[1, 2, 3]),
            (All, &[1, 2, 3], &[], &[2], &[1, 3]),
            (Specific(vec![1, 3]), &[1, 2, 3], &[], &[], &[1, 3]),
            // A specific version that is not stored is not aspired.
            (Specific(vec![4]), &[1, 2, 3], &[], &[], &[]),
            // Labels pin versions whatever the policy...
            (Latest(1), &[1, 2, 3], &[1], &[], &[1, 3]),
            (Specific(vec![3]), &[1, 2, 3], &[2], &[], &[2, 3]),
            // ...but only stored ones that load.
            (Latest(1), &[2, 3], &[1], &[], &[3]),
            (Latest(1), &[1, 2, 3], &[1], &[1], &[3]),
            // A label on the newest adds nothing.
            (Latest(1), &[1, 2, 3], &[3], &[], &[3]),
        ];
        for (policy, stored, labelled, failed, want) in table {
            assert_eq!(
                aspired(policy, &set(stored), &set(labelled), &set(failed)),
                set(want),
                "{policy:?} stored {stored:?} labelled {labelled:?} failed {failed:?}"
            );
        }
    }
}
