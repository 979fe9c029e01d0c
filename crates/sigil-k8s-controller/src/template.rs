//! The template language of `ClusterSPIFFEID`: text with `{{ … }}` actions in
//! the syntax of spire-controller-manager's Go templates, limited to field
//! lookups so that a template can do nothing but copy values.
//!
//! An action is either a field, `{{ .PodMeta.Namespace }}`, or a label
//! lookup, `{{ index .PodMeta.Labels "app" }}` / `{{ index .NodeMeta.Labels
//! "topology.kubernetes.io/zone" }}`. Fields:
//!
//! | field | value |
//! |---|---|
//! | `.TrustDomain` | the server's trust domain |
//! | `.ClusterName` | the controller's cluster name (the PSAT cluster profile) |
//! | `.ClusterDomain` | the cluster's DNS domain (default `cluster.local`) |
//! | `.PodMeta.Name`, `.PodMeta.Namespace`, `.PodMeta.UID` | the pod's metadata |
//! | `.PodMeta.Labels` (with `index`) | a pod label |
//! | `.PodSpec.ServiceAccountName`, `.PodSpec.NodeName` | the pod's spec |
//! | `.NodeMeta.Name`, `.NodeMeta.UID` | the pod's node |
//! | `.NodeMeta.Labels` (with `index`) | a node label, e.g. `topology.kubernetes.io/region` |
//!
//! A label that is not set is an error (Go templates would print `<no value>`),
//! as is an empty value. Anything else in an action (pipelines, functions
//! other than `index`, trim markers) is refused when the template is parsed.

use std::fmt;

/// Why a template could not be parsed or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A `{{` has no matching `}}`.
    #[error("template {template:?}: unclosed action (missing }}}})")]
    Unclosed {
        /// The template.
        template: String,
    },
    /// An action is neither a known field nor `index <labels> "<key>"`.
    #[error("template {template:?}: unsupported action {{{{{action}}}}} ({reason})")]
    BadAction {
        /// The template.
        template: String,
        /// The action's text.
        action: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A label the template reads is not set on the pod or node.
    #[error("{object} label {key:?} is not set")]
    MissingLabel {
        /// `pod` or `node`.
        object: &'static str,
        /// The label key.
        key: String,
    },
    /// A field the template reads is empty (e.g. a pod without a node).
    #[error("{0} is empty")]
    EmptyField(String),
}

/// A value a template can read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Field {
    /// `.TrustDomain`.
    TrustDomain,
    /// `.ClusterName`.
    ClusterName,
    /// `.ClusterDomain`.
    ClusterDomain,
    /// `.PodMeta.Name`.
    PodName,
    /// `.PodMeta.Namespace`.
    PodNamespace,
    /// `.PodMeta.UID`.
    PodUid,
    /// `index .PodMeta.Labels "<key>"`.
    PodLabel(String),
    /// `.PodSpec.ServiceAccountName`.
    ServiceAccountName,
    /// `.PodSpec.NodeName`.
    NodeName,
    /// `.NodeMeta.Name` (the same as `.PodSpec.NodeName`).
    NodeMetaName,
    /// `.NodeMeta.UID`.
    NodeUid,
    /// `index .NodeMeta.Labels "<key>"`.
    NodeLabel(String),
}

impl Field {
    /// The field as written in a template.
    pub fn name(&self) -> String {
        match self {
            Field::TrustDomain => ".TrustDomain".into(),
            Field::ClusterName => ".ClusterName".into(),
            Field::ClusterDomain => ".ClusterDomain".into(),
            Field::PodName => ".PodMeta.Name".into(),
            Field::PodNamespace => ".PodMeta.Namespace".into(),
            Field::PodUid => ".PodMeta.UID".into(),
            Field::PodLabel(k) => format!("index .PodMeta.Labels {k:?}"),
            Field::ServiceAccountName => ".PodSpec.ServiceAccountName".into(),
            Field::NodeName => ".PodSpec.NodeName".into(),
            Field::NodeMetaName => ".NodeMeta.Name".into(),
            Field::NodeUid => ".NodeMeta.UID".into(),
            Field::NodeLabel(k) => format!("index .NodeMeta.Labels {k:?}"),
        }
    }

    fn parse_path(path: &str) -> Option<Self> {
        Some(match path {
            ".TrustDomain" => Field::TrustDomain,
            ".ClusterName" => Field::ClusterName,
            ".ClusterDomain" => Field::ClusterDomain,
            ".PodMeta.Name" => Field::PodName,
            ".PodMeta.Namespace" => Field::PodNamespace,
            ".PodMeta.UID" => Field::PodUid,
            ".PodSpec.ServiceAccountName" => Field::ServiceAccountName,
            ".PodSpec.NodeName" => Field::NodeName,
            ".NodeMeta.Name" => Field::NodeMetaName,
            ".NodeMeta.UID" => Field::NodeUid,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The values a template reads, for one pod.
pub trait Values {
    /// The value of `field`, or why there is none.
    fn value(&self, field: &Field) -> Result<String, TemplateError>;
}

impl Template {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(TemplateError::Unclosed {
                    template: source.to_owned(),
                });
            };
            parts.push(Part::Field(parse_action(source, &after[..end])?));
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err(TemplateError::BadAction {
                template: source.to_owned(),
                action: String::new(),
                reason: "}} without {{".into(),
            });
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The fields the template reads.
    pub fn fields(&self) -> impl Iterator<Item = &Field> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f),
            Part::Text(_) => None,
        })
    }

    /// Renders the template with `values`.
    pub fn render(&self, values: &dyn Values) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(&values.value(f)?),
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn parse_action(template: &str, action: &str) -> Result<Field, TemplateError> {
    let bad = |reason: &str| TemplateError::BadAction {
        template: template.to_owned(),
        action: action.to_owned(),
        reason: reason.to_owned(),
    };
    let text = action.trim();
    if text.starts_with('-') || text.ends_with('-') {
        return Err(bad("trim markers are not supported"));
    }
    if let Some(args) = text.strip_prefix("index ") {
        let args = args.trim_start();
        let (map, key) = args
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("index takes a label map and a quoted key"))?;
        let key =
            parse_quoted(key.trim()).ok_or_else(|| bad("the key must be one quoted string"))?;
        if key.is_empty() {
            return Err(bad("the label key is empty"));
        }
        return match map {
            ".PodMeta.Labels" => Ok(Field::PodLabel(key)),
            ".NodeMeta.Labels" => Ok(Field::NodeLabel(key)),
            _ => Err(bad("index works on .PodMeta.Labels and .NodeMeta.Labels")),
        };
    }
    if text.contains(char::is_whitespace) || text.contains('|') {
        return Err(bad("only fields and index are supported"));
    }
    Field::parse_path(text).ok_or_else(|| bad("unknown field"))
}

/// A Go double-quoted string with the escapes `\"` and `\\`, or a raw
/// backquoted string.
fn parse_quoted(s: &str) -> Option<String> {
    if let Some(inner) = s.strip_prefix('`').and_then(|r| r.strip_suffix('`')) {
        return (!inner.contains('`')).then(|| inner.to_owned());
    }
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Map(BTreeMap<Field, String>);

    impl Values for Map {
        fn value(&self, field: &Field) -> Result<String, TemplateError> {
            match (self.0.get(field), field) {
                (Some(v), _) => Ok(v.clone()),
                (None, Field::PodLabel(k)) => Err(TemplateError::MissingLabel {
                    object: "pod",
                    key: k.clone(),
                }),
                (None, f) => Err(TemplateError::EmptyField(f.name())),
            }
        }
    }

    fn values() -> Map {
        Map(BTreeMap::from([
            (Field::TrustDomain, "example.org".to_owned()),
            (Field::PodNamespace, "payments".to_owned()),
            (Field::ServiceAccountName, "api".to_owned()),
            (Field::PodLabel("app".into()), "web".to_owned()),
            (
                Field::NodeLabel("topology.kubernetes.io/zone".into()),
                "us-east-1a".to_owned(),
            ),
        ]))
    }

    #[test]
    fn renders_fields_and_labels() {
        let t = Template::parse(
            "spiffe://{{ .TrustDomain }}/ns/{{.PodMeta.Namespace}}/sa/{{ .PodSpec.ServiceAccountName }}/{{ index .PodMeta.Labels \"app\" }}/{{index .NodeMeta.Labels `topology.kubernetes.io/zone`}}",
        )
        .unwrap();
        assert_eq!(
            t.render(&values()).unwrap(),
            "spiffe://example.org/ns/payments/sa/api/web/us-east-1a"
        );
        assert_eq!(t.fields().count(), 5);
        assert_eq!(
            Template::parse("plain").unwrap().render(&values()).unwrap(),
            "plain"
        );
    }

    #[test]
    fn missing_label_is_an_error() {
        let t = Template::parse("{{ index .PodMeta.Labels \"tier\" }}").unwrap();
        let err = t.render(&values()).unwrap_err();
        assert_eq!(err.to_string(), "pod label \"tier\" is not set");
    }

    #[test]
    fn refuses_anything_but_lookups() {
        for (src, want) in [
            ("{{ .PodMeta.Name", "unclosed"),
            ("a }} b", "without"),
            ("{{ .PodMeta.Nope }}", "unknown field"),
            ("{{ printf \"%s\" .PodMeta.Name }}", "only fields"),
            ("{{ .PodMeta.Name | upper }}", "only fields"),
            ("{{- .PodMeta.Name }}", "trim markers"),
            ("{{ index .PodSpec \"x\" }}", "index works on"),
            ("{{ index .PodMeta.Labels app }}", "quoted"),
            ("{{ index .PodMeta.Labels \"\" }}", "empty"),
            ("{{ index .PodMeta.Labels }}", "index takes"),
            ("{{ call .X }}", "only fields"),
            ("{{}}", "unknown field"),
        ] {
            let err = Template::parse(src).unwrap_err().to_string();
            assert!(err.contains(want), "{src}: {err}");
        }
    }

    #[test]
    fn quoted_keys() {
        assert_eq!(parse_quoted(r#""a\"b""#).as_deref(), Some("a\"b"));
        assert_eq!(parse_quoted(r#""a\\b""#).as_deref(), Some("a\\b"));
        assert_eq!(parse_quoted(r#""a\nb""#), None);
        assert_eq!(parse_quoted(r#""a"b""#), None);
        assert_eq!(parse_quoted("`raw\\`").as_deref(), Some("raw\\"));
    }
}
