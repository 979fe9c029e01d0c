//! The authorization policy: which caller may open a connection to which
//! callee, written as TOML rules (docs/policy.md).
//!
//! Evaluation, in this order:
//!
//! 1. every `[[deny]]` rule, in file order: the first that matches denies;
//! 2. every `[[allow]]` rule, in file order: the first that matches allows;
//! 3. nothing matched: denied by default.
//!
//! A rule matches when its `from` matches the caller's SPIFFE ID, its `to`
//! matches the callee's, and every attribute named in `when` is present on
//! the caller's identity with one of the listed values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use sigil_types::{Attribute, SpiffeId, TrustDomain};

/// The label used for "no rule decided" in logs and metrics. It cannot
/// clash with a rule name, since rule names may not contain `<`.
pub const DEFAULT_RULE: &str = "<default>";

/// The longest rule name accepted.
const MAX_NAME_LEN: usize = 128;

/// Why a policy file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or not of this schema (unknown keys, wrong types).
    #[error("invalid policy file {origin}: {message}")]
    Syntax {
        /// The file (or other origin) of the text.
        origin: String,
        /// The TOML parser's message, with the line and column.
        message: String,
    },
    /// One rule is wrong.
    #[error("invalid policy file {origin}, line {line}: [[{kind}]] rule #{index}{}: {message}",
        name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default())]
    Rule {
        /// The file (or other origin) of the text.
        origin: String,
        /// The line where the rule starts (1-based).
        line: usize,
        /// `allow` or `deny`.
        kind: Effect,
        /// The rule's position among the rules of its kind (1-based).
        index: usize,
        /// The rule's name, when it has a valid one.
        name: Option<String>,
        /// What is wrong, naming the key.
        message: String,
    },
    /// An identity or attribute given to the policy (not the file) is malformed.
    #[error("{0}")]
    Input(String),
}

/// Whether a rule allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// An `[[allow]]` rule.
    Allow,
    /// A `[[deny]]` rule; deny rules win over allow rules.
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// A pattern over SPIFFE IDs: a literal trust domain and a path whose
/// segments are literals, `*` (exactly one segment) or, last only, `**` (one
/// or more segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    text: String,
    trust_domain: TrustDomain,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl IdPattern {
    /// Whether `id` matches the pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if !id.is_member_of(&self.trust_domain) {
            return false;
        }
        let path = id.path();
        let parts: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path[1..].split('/').collect()
        };
        let mut i = 0;
        for seg in &self.segments {
            match seg {
                Segment::Rest => return parts.len() > i,
                Segment::One => {
                    if i >= parts.len() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.get(i) != Some(&l.as_str()) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == parts.len()
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for IdPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{text:?} must start with spiffe://"))?;
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let trust_domain = TrustDomain::new(td)
            .map_err(|e| format!("{text:?}: the trust domain is not valid: {e}"))?;
        let mut segments = Vec::new();
        if !path.is_empty() {
            let parts: Vec<&str> = path[1..].split('/').collect();
            for (i, part) in parts.iter().enumerate() {
                let seg = match *part {
                    "*" => Segment::One,
                    "**" if i + 1 == parts.len() => Segment::Rest,
                    "**" => return Err(format!("{text:?}: `**` may only be the last segment")),
                    p if p.contains('*') => {
                        return Err(format!(
                            "{text:?}: `*` must be a whole segment (`/*/`), not part of {p:?}"
                        ));
                    }
                    p => Segment::Literal(p.to_owned()),
                };
                segments.push(seg);
            }
            // With each wildcard read as one plain segment, the path must be
            // a valid SPIFFE ID path (no empty, `.` or `..` segments).
            let literal: String = parts
                .iter()
                .map(|p| {
                    if p.contains('*') {
                        "/x".to_owned()
                    } else {
                        format!("/{p}")
                    }
                })
                .collect();
            sigil_types::spiffe_id::validate_path(&literal)
                .map_err(|e| format!("{text:?}: the path is not valid: {e}"))?;
        }
        if !segments.iter().any(|s| !matches!(s, Segment::Literal(_))) {
            return Err(format!(
                "{text:?} has no `*` or `**`; use spiffe_id for one exact ID"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            trust_domain,
            segments,
        })
    }
}

/// What one side (`from` or `to`) of a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// This ID and every ID below it, at a segment boundary:
    /// `spiffe://td/ns/web` matches `…/ns/web` and `…/ns/web/x`, not `…/ns/webby`.
    Prefix(SpiffeId),
    /// A pattern with `*` and `**` segments.
    Pattern(IdPattern),
    /// Every ID of a trust domain.
    TrustDomain(TrustDomain),
}

impl Matcher {
    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => id == want,
            Self::Prefix(prefix) => {
                id.trust_domain_name() == prefix.trust_domain_name()
                    && id
                        .path()
                        .strip_prefix(prefix.path())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::Pattern(p) => p.matches(id),
            Self::TrustDomain(td) => id.is_member_of(td),
        }
    }

    /// The matcher as the rule's TOML would say it, e.g. `id_prefix = "spiffe://td/ns/web/"`.
    pub fn describe(&self) -> String {
        match self {
            Self::Exact(id) => format!("spiffe_id = {:?}", id.as_str()),
            Self::Prefix(id) => format!("id_prefix = \"{id}/\""),
            Self::Pattern(p) => format!("pattern = {:?}", p.text),
            Self::TrustDomain(td) => format!("trust_domain = {:?}", td.name()),
        }
    }

    /// A short label for graph nodes.
    pub fn label(&self) -> String {
        match self {
            Self::Exact(id) => id.to_string(),
            Self::Prefix(id) => format!("{id}/…"),
            Self::Pattern(p) => p.text.clone(),
            Self::TrustDomain(td) => format!("any in {td}"),
        }
    }
}

/// One rule of the policy.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's name, unique in the file; logged and counted with every decision it makes.
    pub name: String,
    /// Allow or deny.
    pub effect: Effect,
    /// Who calls.
    pub from: Matcher,
    /// Who is called.
    pub to: Matcher,
    /// Conditions on the caller's identity attributes: each listed attribute
    /// must be present with one of its values.
    pub when: BTreeMap<Attribute, Vec<String>>,
    /// The line where the rule starts in its file (1-based).
    pub line: usize,
    /// The rule's position among the rules of its kind (1-based).
    pub index: usize,
}

impl Rule {
    fn ids_match(&self, caller: &SpiffeId, callee: &SpiffeId) -> bool {
        self.from.matches(caller) && self.to.matches(callee)
    }

    /// The first `when` condition that `attributes` fail, if any.
    fn failed_condition(&self, attributes: &[(String, String)]) -> Option<String> {
        for (attr, values) in &self.when {
            let have = attributes
                .iter()
                .find(|(n, _)| n == attr.as_str())
                .map(|(_, v)| v);
            match have {
                Some(v) if values.contains(v) => {}
                Some(v) => {
                    return Some(format!(
                        "the caller's {attr} is {v:?}, the rule wants {}",
                        one_of(values)
                    ));
                }
                None => {
                    return Some(format!(
                        "the caller has no {attr} attribute, the rule wants {}",
                        one_of(values)
                    ));
                }
            }
        }
        None
    }

    /// The `when` conditions as text, e.g. `region=us-east-1, namespace in [a, b]`.
    pub fn describe_when(&self) -> String {
        self.when
            .iter()
            .map(|(a, vs)| match vs.as_slice() {
                [one] => format!("{a}={one}"),
                many => format!("{a} in [{}]", many.join(", ")),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Where the rule is: `[[allow]] #2 "name" (line 7)`.
    pub fn location(&self) -> String {
        format!(
            "[[{}]] #{} {:?} (line {})",
            self.effect, self.index, self.name, self.line
        )
    }
}

fn one_of(values: &[String]) -> String {
    match values {
        [one] => format!("{one:?}"),
        many => format!("one of {many:?}"),
    }
}

/// Who calls whom, as the policy sees a connection.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's SPIFFE ID (authenticated by its X509-SVID).
    pub caller: &'a SpiffeId,
    /// The callee's SPIFFE ID.
    pub callee: &'a SpiffeId,
    /// The caller's identity attributes (name, value), from its X509-SVID.
    pub attributes: &'a [(String, String)],
}

/// The outcome of a policy check.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'p> {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// The rule that decided; `None` when no rule matched (denied by default).
    pub rule: Option<&'p Rule>,
}

impl Decision<'_> {
    /// The deciding rule's name, or [`DEFAULT_RULE`].
    pub fn rule_name(&self) -> &str {
        self.rule.map_or(DEFAULT_RULE, |r| r.name.as_str())
    }

    /// `allowed` or `denied`.
    pub fn verdict(&self) -> &'static str {
        if self.allowed { "allowed" } else { "denied" }
    }
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(r) => write!(f, "{} by rule {}", self.verdict(), r.location()),
            None => f.write_str("denied: no rule allows it (denied by default)"),
        }
    }
}

/// A decision with the reasons around it, for `sigil policy check`.
#[derive(Debug, Clone)]
pub struct Explanation<'p> {
    /// The decision.
    pub decision: Decision<'p>,
    /// Rules whose `from` and `to` matched but whose `when` did not, with why.
    pub unmet_conditions: Vec<(&'p Rule, String)>,
    /// Allow rules that also matched but were overruled by a deny rule.
    pub overruled: Vec<&'p Rule>,
}

/// A parsed, validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    origin: String,
    rules: Vec<Rule>,
}

impl Policy {
    /// The policy that denies everything (no rules).
    pub fn deny_all(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            rules: Vec::new(),
        }
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a policy from TOML text; `origin` names it in errors (a file path).
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            origin: origin.to_owned(),
            // TOML errors quote the offending line, which may be huge.
            message: sigil_types::text::truncate(
                e.to_string().trim_end(),
                4 * sigil_types::text::MAX_ECHO_BYTES,
            )
            .into_owned(),
        })?;
        let mut rules = Vec::new();
        for (effect, list) in [(Effect::Deny, raw.deny), (Effect::Allow, raw.allow)] {
            for (i, spanned) in list.into_iter().enumerate() {
                let line = line_of(text, spanned.span().start);
                let raw_rule = spanned.into_inner();
                let name = raw_rule.name.clone();
                let fail = |message: String, named: bool| PolicyError::Rule {
                    origin: origin.to_owned(),
                    line,
                    kind: effect,
                    index: i + 1,
                    name: named.then(|| name.clone()),
                    message,
                };
                check_name(&raw_rule.name).map_err(|m| fail(m, false))?;
                if let Some(other) = rules.iter().find(|r: &&Rule| r.name == raw_rule.name) {
                    return Err(fail(
                        format!(
                            "name: {:?} is already used by {}",
                            raw_rule.name,
                            other.location()
                        ),
                        false,
                    ));
                }
                let from = raw_rule
                    .from
                    .into_matcher()
                    .map_err(|m| fail(format!("from: {m}"), true))?;
                let to = raw_rule
                    .to
                    .into_matcher()
                    .map_err(|m| fail(format!("to: {m}"), true))?;
                let mut when = BTreeMap::new();
                for (key, values) in raw_rule.when {
                    let attr = Attribute::from_str(&key)
                        .map_err(|e| fail(format!("when.{key}: {e}"), true))?;
                    let values = match values {
                        OneOrMany::One(v) => vec![v],
                        OneOrMany::Many(vs) => vs,
                    };
                    if values.is_empty() {
                        return Err(fail(
                            format!(
                                "when.{key}: the list of values is empty (nothing could match)"
                            ),
                            true,
                        ));
                    }
                    when.insert(attr, values);
                }
                rules.push(Rule {
                    name: raw_rule.name,
                    effect,
                    from,
                    to,
                    when,
                    line,
                    index: i + 1,
                });
            }
        }
        Ok(Self {
            origin: origin.to_owned(),
            rules,
        })
    }

    /// Where the policy came from (its file path).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Every rule: the deny rules first, then the allow rules, each in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Decides one connection.
    pub fn decide(&self, req: &Request<'_>) -> Decision<'_> {
        let rule = self.rules.iter().find(|r| {
            r.ids_match(req.caller, req.callee) && r.failed_condition(req.attributes).is_none()
        });
        Decision {
            allowed: rule.is_some_and(|r| r.effect == Effect::Allow),
            rule,
        }
    }

    /// Decides one connection and says why, naming the rules that nearly matched.
    pub fn explain(&self, req: &Request<'_>) -> Explanation<'_> {
        let decision = self.decide(req);
        let mut unmet_conditions = Vec::new();
        let mut overruled = Vec::new();
        for r in &self.rules {
            if !r.ids_match(req.caller, req.callee) {
                continue;
            }
            match r.failed_condition(req.attributes) {
                Some(why) => unmet_conditions.push((r, why)),
                None => {
                    if r.effect == Effect::Allow && !decision.allowed {
                        overruled.push(r);
                    }
                }
            }
        }
        Explanation {
            decision,
            unmet_conditions,
            overruled,
        }
    }

    /// Whether the connection is allowed; [`decide`](Self::decide) without the rule.
    pub fn allows(&self, caller: &SpiffeId, callee: &SpiffeId, attrs: &[(String, String)]) -> bool {
        self.decide(&Request {
            caller,
            callee,
            attributes: attrs,
        })
        .allowed
    }

    /// The communication graph as Graphviz DOT: one node per distinct
    /// `from`/`to`, a solid edge per allow rule, a dashed red edge per deny rule.
    pub fn to_dot(&self) -> String {
        let (nodes, edges) = self.graph();
        let mut out = String::from("digraph policy {\n  rankdir=LR;\n  node [shape=box];\n");
        for (i, label) in nodes.iter().enumerate() {
            out.push_str(&format!("  n{i} [label={}];\n", dot_quote(label)));
        }
        for e in &edges {
            let style = match e.effect {
                Effect::Allow => String::new(),
                Effect::Deny => ", color=red, fontcolor=red, style=dashed".to_owned(),
            };
            out.push_str(&format!(
                "  n{} -> n{} [label={}{style}];\n",
                e.from,
                e.to,
                dot_quote(&e.label)
            ));
        }
        out.push_str("}\n");
        out
    }

    /// The communication graph as a Mermaid flowchart: one node per distinct
    /// `from`/`to`, a solid arrow per allow rule, a dotted arrow per deny rule.
    pub fn to_mermaid(&self) -> String {
        let (nodes, edges) = self.graph();
        let mut out = String::from("flowchart LR\n");
        for (i, label) in nodes.iter().enumerate() {
            out.push_str(&format!("  n{i}[\"{}\"]\n", mermaid_escape(label)));
        }
        for e in &edges {
            let arrow = match e.effect {
                Effect::Allow => "-->",
                Effect::Deny => "-.->",
            };
            out.push_str(&format!(
                "  n{} {arrow}|\"{}\"| n{}\n",
                e.from,
                mermaid_escape(&e.label),
                e.to
            ));
        }
        let denies: Vec<usize> = edges
            .iter()
            .enumerate()
            .filter(|(_, e)| e.effect == Effect::Deny)
            .map(|(i, _)| i)
            .collect();
        if !denies.is_empty() {
            let list: Vec<String> = denies.iter().map(usize::to_string).collect();
            out.push_str(&format!(
                "  linkStyle {} stroke:red,color:red\n",
                list.join(",")
            ));
        }
        out
    }

    /// Nodes (labels, in first-use order, allow rules first) and edges.
    fn graph(&self) -> (Vec<String>, Vec<Edge>) {
        let mut nodes: Vec<String> = Vec::new();
        let mut index = |label: String| match nodes.iter().position(|n| *n == label) {
            Some(i) => i,
            None => {
                nodes.push(label);
                nodes.len() - 1
            }
        };
        let ordered = self
            .rules
            .iter()
            .filter(|r| r.effect == Effect::Allow)
            .chain(self.rules.iter().filter(|r| r.effect == Effect::Deny));
        let mut edges = Vec::new();
        for r in ordered {
            let from = index(r.from.label());
            let to = index(r.to.label());
            let mut label = match r.effect {
                Effect::Allow => r.name.clone(),
                Effect::Deny => format!("deny: {}", r.name),
            };
            if !r.when.is_empty() {
                label.push_str(&format!(" (when {})", r.describe_when()));
            }
            edges.push(Edge {
                from,
                to,
                label,
                effect: r.effect,
            });
        }
        (nodes, edges)
    }
}

struct Edge {
    from: usize,
    to: usize,
    label: String,
    effect: Effect,
}

fn dot_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;")
}

/// Parses `--attr name=value` style attributes, checking the names.
pub fn parse_attribute(s: &str) -> Result<(String, String), PolicyError> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| PolicyError::Input(format!("attribute {s:?} must be written name=value")))?;
    let attr = Attribute::from_str(name).map_err(|e| PolicyError::Input(e.to_string()))?;
    Ok((attr.as_str().to_owned(), value.to_owned()))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name: must not be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name: longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "name: {name:?} contains {c:?}; use letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |before| before.matches('\n').count())
        + 1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    allow: Vec<toml::Spanned<RawRule>>,
    #[serde(default)]
    deny: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    from: RawMatcher,
    to: RawMatcher,
    #[serde(default)]
    when: BTreeMap<String, OneOrMany>,
    /// Free text for readers of the file; not used.
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for people reading the file")]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatcher {
    spiffe_id: Option<String>,
    id_prefix: Option<String>,
    pattern: Option<String>,
    trust_domain: Option<String>,
}

impl RawMatcher {
    fn into_matcher(self) -> Result<Matcher, String> {
        let given = [
            self.spiffe_id.is_some(),
            self.id_prefix.is_some(),
            self.pattern.is_some(),
            self.trust_domain.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(format!(
                "give exactly one of spiffe_id, id_prefix, pattern, trust_domain (found {given})"
            ));
        }
        if let Some(id) = self.spiffe_id {
            let id = SpiffeId::from_str(&id).map_err(|e| format!("spiffe_id {id:?}: {e}"))?;
            return Ok(Matcher::Exact(id));
        }
        if let Some(p) = self.id_prefix {
            let trimmed = p.strip_suffix('/').unwrap_or(&p);
            let id = SpiffeId::from_str(trimmed).map_err(|e| format!("id_prefix {p:?}: {e}"))?;
            if id.is_root() {
                return Err(format!(
                    "id_prefix {p:?} has no path; use trust_domain = {:?} for a whole trust domain",
                    id.trust_domain_name()
                ));
            }
            return Ok(Matcher::Prefix(id));
        }
        if let Some(p) = self.pattern {
            return Ok(Matcher::Pattern(
                IdPattern::from_str(&p).map_err(|e| format!("pattern {e}"))?,
            ));
        }
        if let Some(td) = self.trust_domain {
            let td = TrustDomain::new(&td).map_err(|e| format!("trust_domain {td:?}: {e}"))?;
            return Ok(Matcher::TrustDomain(td));
        }
        Err("no matcher given".to_owned())
    }
}
