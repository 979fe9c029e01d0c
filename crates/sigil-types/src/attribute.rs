//! Identity attributes: facts the server attested about where and as what a
//! workload runs, carried in its credentials when its entry asks for them.
//!
//! Values come only from what the server itself verified: the attesting
//! agent's node selectors (from Kubernetes PSAT node attestation) and the
//! entry's own selectors (which the agent checked against the workload with
//! its attestors). Nothing a workload says about itself becomes an attribute.
//! See docs/attributes.md for the claim names and the X.509 extension.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Selectors;

/// An attribute an entry may carry in its SVIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Attribute {
    /// The Kubernetes cluster the agent attested in (`k8s_psat:cluster:`).
    Cluster,
    /// The node's region (`k8s_psat:region:`, from trusted node labels).
    Region,
    /// The node's zone (`k8s_psat:zone:`, from trusted node labels).
    Zone,
    /// The node's name (`k8s_psat:agent_node_name:`).
    NodeName,
    /// The workload's namespace (the entry's `k8s:ns:` selector).
    Namespace,
    /// The workload's service account (the entry's `k8s:sa:` selector).
    ServiceAccount,
}

impl Attribute {
    /// Every attribute, in documentation order.
    pub const ALL: [Attribute; 6] = [
        Self::Cluster,
        Self::Region,
        Self::Zone,
        Self::NodeName,
        Self::Namespace,
        Self::ServiceAccount,
    ];

    /// The name used in entries, JWT claims and the X.509 extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "cluster",
            Self::Region => "region",
            Self::Zone => "zone",
            Self::NodeName => "node_name",
            Self::Namespace => "namespace",
            Self::ServiceAccount => "service_account",
        }
    }

    /// Where the value comes from: the agent's node selectors (`true`) or
    /// the entry's selectors (`false`), and the selector prefix
    /// (`type:key:`-style, without the value).
    fn source(self) -> (bool, &'static str) {
        match self {
            Self::Cluster => (true, "k8s_psat:cluster:"),
            Self::Region => (true, "k8s_psat:region:"),
            Self::Zone => (true, "k8s_psat:zone:"),
            Self::NodeName => (true, "k8s_psat:agent_node_name:"),
            Self::Namespace => (false, "k8s:ns:"),
            Self::ServiceAccount => (false, "k8s:sa:"),
        }
    }

    /// The selector whose value this attribute takes, e.g. `k8s:ns:` for
    /// [`Attribute::Namespace`].
    pub fn selector_prefix(self) -> &'static str {
        self.source().1
    }

    /// Whether the value comes from the agent's attested node selectors
    /// (otherwise from the entry's selectors).
    pub fn from_node(self) -> bool {
        self.source().0
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attribute name that sigil does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown attribute {0:?} (known: cluster, region, zone, node_name, namespace, service_account)"
)]
pub struct UnknownAttribute(pub String);

impl FromStr for Attribute {
    type Err = UnknownAttribute;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownAttribute(s.to_owned()))
    }
}

impl TryFrom<String> for Attribute {
    type Error = UnknownAttribute;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Attribute> for String {
    fn from(a: Attribute) -> Self {
        a.as_str().to_owned()
    }
}

/// The values of `wanted` for a workload of an entry with `entry_selectors`
/// issued through an agent attested with `node_selectors`, sorted by name.
///
/// An attribute without a source selector is left out; when a selector type
/// appears more than once (say two `k8s_psat:zone:` values) the attribute is
/// left out too, because no single value is attested.
pub fn resolve(
    wanted: &[Attribute],
    node_selectors: &Selectors,
    entry_selectors: &Selectors,
) -> Vec<(Attribute, String)> {
    let mut out: Vec<(Attribute, String)> = Vec::new();
    for &a in wanted {
        if out.iter().any(|(b, _)| *b == a) {
            continue;
        }
        let source = if a.from_node() {
            node_selectors
        } else {
            entry_selectors
        };
        let prefix = a.selector_prefix();
        let mut values = source
            .iter()
            .map(|s| s.to_string())
            .filter_map(|s| s.strip_prefix(prefix).map(str::to_owned));
        if let (Some(v), None) = (values.next(), values.next())
            && !v.is_empty()
        {
            out.push((a, v));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sels(v: &[&str]) -> Selectors {
        Selectors::parse_all(v.iter().copied()).unwrap()
    }

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for a in Attribute::ALL {
            assert_eq!(a.as_str().parse::<Attribute>().unwrap(), a);
        }
        let err = "planet".parse::<Attribute>().unwrap_err();
        assert!(err.to_string().contains("planet"), "{err}");
        let json = serde_json::to_string(&vec![Attribute::Region]).unwrap();
        assert_eq!(json, r#"["region"]"#);
        assert!(serde_json::from_str::<Vec<Attribute>>(r#"["x"]"#).is_err());
    }

    #[test]
    fn values_come_from_node_and_entry_selectors() {
        let node = sels(&[
            "k8s_psat:cluster:prod",
            "k8s_psat:region:us-east-1",
            "k8s_psat:agent_node_name:n1",
            "k8s_psat:zone:a",
            "k8s_psat:zone:b",
        ]);
        let entry = sels(&["k8s:ns:backend", "k8s:sa:api", "unix:uid:0"]);
        let got = resolve(&Attribute::ALL, &node, &entry);
        assert_eq!(
            got,
            vec![
                (Attribute::Cluster, "prod".to_owned()),
                (Attribute::Region, "us-east-1".to_owned()),
                (Attribute::NodeName, "n1".to_owned()),
                (Attribute::Namespace, "backend".to_owned()),
                (Attribute::ServiceAccount, "api".to_owned()),
            ],
            "zone is ambiguous and left out"
        );
        // A namespace on the node side does not count, nor a region on the entry side.
        let got = resolve(
            &[Attribute::Namespace, Attribute::Region],
            &sels(&["k8s:ns:evil"]),
            &sels(&["k8s_psat:region:evil"]),
        );
        assert!(got.is_empty(), "{got:?}");
    }
}
