//! The policy language: parsing, matching, precedence, explanations,
//! graphs, bad files and reloading.

use std::sync::Arc;

use sigil_proxy::policy::{DEFAULT_RULE, Effect, Policy, PolicyError, Request, parse_attribute};
use sigil_proxy::reload::Reload;
use sigil_proxy::{Metrics, PolicyStore};
use sigil_types::SpiffeId;

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn decide(p: &Policy, from: &str, to: &str, attrs: &[(&str, &str)]) -> (bool, String) {
    let attrs: Vec<(String, String)> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let (from, to) = (id(from), id(to));
    let d = p.decide(&Request {
        caller: &from,
        callee: &to,
        attributes: &attrs,
    });
    (d.allowed, d.rule_name().to_owned())
}

const EXAMPLE: &str = r#"
# The frontend may call the backend; the backend may call the database
# and the log server; nothing else.
[[allow]]
name = "frontend-to-backend"
from = { spiffe_id = "spiffe://acme.com/ns/web/sa/frontend" }
to   = { spiffe_id = "spiffe://acme.com/ns/backend/sa/api" }

[[allow]]
name = "backend-to-db"
from = { spiffe_id = "spiffe://acme.com/ns/backend/sa/api" }
to   = { pattern = "spiffe://acme.com/ns/db/sa/*" }
when = { region = "us-east-1" }

[[allow]]
name = "anyone-in-ns-to-logs"
from = { id_prefix = "spiffe://acme.com/ns/backend/" }
to   = { spiffe_id = "spiffe://acme.com/ns/logs/sa/collector" }

[[allow]]
name = "partners-to-api"
from = { trust_domain = "partner.org" }
to   = { pattern = "spiffe://acme.com/ns/backend/**" }
when = { namespace = ["payments", "billing"] }

[[deny]]
name = "no-legacy"
from = { pattern = "spiffe://acme.com/ns/*/sa/legacy" }
to   = { trust_domain = "acme.com" }
"#;

#[test]
fn exact_ids_and_default_deny() {
    let p = Policy::parse(EXAMPLE, "example.toml").unwrap();
    assert_eq!(
        decide(
            &p,
            "spiffe://acme.com/ns/web/sa/frontend",
            "spiffe://acme.com/ns/backend/sa/api",
            &[]
        ),
        (true, "frontend-to-backend".into())
    );
    // The reverse direction is not allowed by anything.
    assert_eq!(
        decide(
            &p,
            "spiffe://acme.com/ns/backend/sa/api",
            "spiffe://acme.com/ns/web/sa/frontend",
            &[]
        ),
        (false, DEFAULT_RULE.into())
    );
    // Neither is the frontend calling the database.
    assert!(
        !decide(
            &p,
            "spiffe://acme.com/ns/web/sa/frontend",
            "spiffe://acme.com/ns/db/sa/postgres",
            &[("region", "us-east-1")]
        )
        .0
    );
    assert!(!Policy::deny_all("none").allows(
        &id("spiffe://acme.com/a"),
        &id("spiffe://acme.com/b"),
        &[]
    ));
}

#[test]
fn prefixes_are_segment_aware() {
    let p = Policy::parse(EXAMPLE, "example.toml").unwrap();
    let logs = "spiffe://acme.com/ns/logs/sa/collector";
    assert!(decide(&p, "spiffe://acme.com/ns/backend/sa/api", logs, &[]).0);
    assert!(decide(&p, "spiffe://acme.com/ns/backend", logs, &[]).0);
    assert!(!decide(&p, "spiffe://acme.com/ns/backendx/sa/api", logs, &[]).0);
    assert!(!decide(&p, "spiffe://other.com/ns/backend/sa/api", logs, &[]).0);
}

#[test]
fn patterns_match_whole_segments() {
    let p = Policy::parse(EXAMPLE, "example.toml").unwrap();
    let api = "spiffe://acme.com/ns/backend/sa/api";
    let us = [("region", "us-east-1")];
    assert!(decide(&p, api, "spiffe://acme.com/ns/db/sa/postgres", &us).0);
    // `*` is one segment: not zero, not two.
    assert!(!decide(&p, api, "spiffe://acme.com/ns/db/sa", &us).0);
    assert!(!decide(&p, api, "spiffe://acme.com/ns/db/sa/pg/replica", &us).0);
    // `**` is one or more segments.
    let partner = "spiffe://partner.org/svc/checkout";
    let ns = [("namespace", "payments")];
    assert!(decide(&p, partner, "spiffe://acme.com/ns/backend/sa/api", &ns).0);
    assert!(decide(&p, partner, "spiffe://acme.com/ns/backend/x", &ns).0);
    assert!(!decide(&p, partner, "spiffe://acme.com/ns/backend", &ns).0);
    assert!(!decide(&p, partner, "spiffe://acme.com/ns/backendz/x", &ns).0);
}

#[test]
fn attributes_must_be_present_with_a_listed_value() {
    let p = Policy::parse(EXAMPLE, "example.toml").unwrap();
    let api = "spiffe://acme.com/ns/backend/sa/api";
    let db = "spiffe://acme.com/ns/db/sa/postgres";
    assert!(decide(&p, api, db, &[("region", "us-east-1"), ("zone", "a")]).0);
    assert!(!decide(&p, api, db, &[("region", "eu-west-1")]).0);
    assert!(!decide(&p, api, db, &[]).0);
    let partner = "spiffe://partner.org/svc/checkout";
    assert!(decide(&p, partner, api, &[("namespace", "billing")]).0);
    assert!(!decide(&p, partner, api, &[("namespace", "marketing")]).0);
}

#[test]
fn deny_rules_win_over_allow_rules() {
    let text = format!(
        "{EXAMPLE}\n[[allow]]\nname = \"legacy-to-backend\"\nfrom = {{ spiffe_id = \"spiffe://acme.com/ns/web/sa/legacy\" }}\nto = {{ spiffe_id = \"spiffe://acme.com/ns/backend/sa/api\" }}\n"
    );
    let p = Policy::parse(&text, "example.toml").unwrap();
    let (allowed, rule) = decide(
        &p,
        "spiffe://acme.com/ns/web/sa/legacy",
        "spiffe://acme.com/ns/backend/sa/api",
        &[],
    );
    assert!(!allowed);
    assert_eq!(rule, "no-legacy");
    // The explanation names the allow rule that was overruled.
    let (from, to) = (
        id("spiffe://acme.com/ns/web/sa/legacy"),
        id("spiffe://acme.com/ns/backend/sa/api"),
    );
    let e = p.explain(&Request {
        caller: &from,
        callee: &to,
        attributes: &[],
    });
    assert_eq!(e.overruled.len(), 1);
    assert_eq!(e.overruled[0].name, "legacy-to-backend");
    assert_eq!(e.decision.rule.unwrap().effect, Effect::Deny);
}

#[test]
fn explanations_name_the_rule_and_the_unmet_conditions() {
    let p = Policy::parse(EXAMPLE, "example.toml").unwrap();
    let (from, to) = (
        id("spiffe://acme.com/ns/backend/sa/api"),
        id("spiffe://acme.com/ns/db/sa/postgres"),
    );
    let attrs = vec![("region".to_owned(), "eu-west-1".to_owned())];
    let e = p.explain(&Request {
        caller: &from,
        callee: &to,
        attributes: &attrs,
    });
    assert!(!e.decision.allowed);
    assert_eq!(
        e.decision.to_string(),
        "denied: no rule allows it (denied by default)"
    );
    assert_eq!(e.unmet_conditions.len(), 1);
    assert_eq!(e.unmet_conditions[0].0.name, "backend-to-db");
    assert_eq!(
        e.unmet_conditions[0].1,
        "the caller's region is \"eu-west-1\", the rule wants \"us-east-1\""
    );
    let attrs = vec![("region".to_owned(), "us-east-1".to_owned())];
    let e = p.explain(&Request {
        caller: &from,
        callee: &to,
        attributes: &attrs,
    });
    assert_eq!(
        e.decision.to_string(),
        "allowed by rule [[allow]] #2 \"backend-to-db\" (line 9)"
    );
}

#[test]
fn graphs_render_as_dot_and_mermaid() {
    let p = Policy::parse(EXAMPLE, "example.toml").unwrap();
    let dot = r#"digraph policy {
  rankdir=LR;
  node [shape=box];
  n0 [label="spiffe://acme.com/ns/web/sa/frontend"];
  n1 [label="spiffe://acme.com/ns/backend/sa/api"];
  n2 [label="spiffe://acme.com/ns/db/sa/*"];
  n3 [label="spiffe://acme.com/ns/backend/…"];
  n4 [label="spiffe://acme.com/ns/logs/sa/collector"];
  n5 [label="any in partner.org"];
  n6 [label="spiffe://acme.com/ns/backend/**"];
  n7 [label="spiffe://acme.com/ns/*/sa/legacy"];
  n8 [label="any in acme.com"];
  n0 -> n1 [label="frontend-to-backend"];
  n1 -> n2 [label="backend-to-db (when region=us-east-1)"];
  n3 -> n4 [label="anyone-in-ns-to-logs"];
  n5 -> n6 [label="partners-to-api (when namespace in [payments, billing])"];
  n7 -> n8 [label="deny: no-legacy", color=red, fontcolor=red, style=dashed];
}
"#;
    assert_eq!(p.to_dot(), dot);
    let mermaid = r#"flowchart LR
  n0["spiffe://acme.com/ns/web/sa/frontend"]
  n1["spiffe://acme.com/ns/backend/sa/api"]
  n2["spiffe://acme.com/ns/db/sa/*"]
  n3["spiffe://acme.com/ns/backend/…"]
  n4["spiffe://acme.com/ns/logs/sa/collector"]
  n5["any in partner.org"]
  n6["spiffe://acme.com/ns/backend/**"]
  n7["spiffe://acme.com/ns/*/sa/legacy"]
  n8["any in acme.com"]
  n0 -->|"frontend-to-backend"| n1
  n1 -->|"backend-to-db (when region=us-east-1)"| n2
  n3 -->|"anyone-in-ns-to-logs"| n4
  n5 -->|"partners-to-api (when namespace in [payments, billing])"| n6
  n7 -.->|"deny: no-legacy"| n8
  linkStyle 4 stroke:red,color:red
"#;
    assert_eq!(p.to_mermaid(), mermaid);
    // An empty policy is an empty graph, not an error.
    assert_eq!(
        Policy::parse("", "empty.toml").unwrap().to_mermaid(),
        "flowchart LR\n"
    );
}

/// Parses `text` and returns the error message.
fn rejected(text: &str) -> String {
    Policy::parse(text, "p.toml").unwrap_err().to_string()
}

#[test]
fn bad_files_are_rejected_with_file_line_and_rule() {
    let rule = |from: &str| {
        format!(
            "# comment\n\n[[allow]]\nname = \"r1\"\nfrom = {from}\nto = {{ trust_domain = \"acme.com\" }}\n"
        )
    };
    let cases: &[(String, &str)] = &[
        (
            rule("{ spiffe_id = \"spiffe://acme.com/a\", trust_domain = \"acme.com\" }"),
            "invalid policy file p.toml, line 3: [[allow]] rule #1 \"r1\": from: give exactly one of spiffe_id, id_prefix, pattern, trust_domain (found 2)",
        ),
        (
            rule("{ spiffe_id = \"http://acme.com/a\" }"),
            "invalid policy file p.toml, line 3: [[allow]] rule #1 \"r1\": from: spiffe_id \"http://acme.com/a\":",
        ),
        (
            rule("{ pattern = \"spiffe://acme.com/ns/web*\" }"),
            "`*` must be a whole segment",
        ),
        (
            rule("{ pattern = \"spiffe://acme.com/**/x\" }"),
            "`**` may only be the last segment",
        ),
        (
            rule("{ pattern = \"spiffe://acme.com/a/b\" }"),
            "has no `*` or `**`; use spiffe_id",
        ),
        (
            rule("{ id_prefix = \"spiffe://acme.com/\" }"),
            "has no path; use trust_domain = \"acme.com\"",
        ),
        (
            rule("{ trust_domain = \"Acme.com\" }"),
            "from: trust_domain \"Acme.com\"",
        ),
        (
            rule("{ spiffe_id = \"spiffe://acme.com/a\" }").replace("to =", "too ="),
            "invalid policy file p.toml: TOML parse error at line 6",
        ),
        (
            rule("{ spiffe_id = \"spiffe://acme.com/a\" }") + "when = { regoin = \"x\" }\n",
            "when.regoin: unknown attribute \"regoin\"",
        ),
        (
            rule("{ spiffe_id = \"spiffe://acme.com/a\" }") + "when = { region = [] }\n",
            "when.region: the list of values is empty",
        ),
        (
            rule("{ spiffe_id = \"spiffe://acme.com/a\" }").replace("\"r1\"", "\"has space\""),
            "line 3: [[allow]] rule #1: name: \"has space\" contains ' '",
        ),
        (
            format!(
                "{}\n[[deny]]\nname = \"r1\"\nfrom = {{ trust_domain = \"a.org\" }}\nto = {{ trust_domain = \"a.org\" }}\n",
                rule("{ spiffe_id = \"spiffe://acme.com/a\" }")
            ),
            "name: \"r1\" is already used by [[deny]] #1 \"r1\" (line 8)",
        ),
        (
            "[[allow]]\nname = \"x\"\n".to_owned(),
            "missing field `from`",
        ),
        ("allow = 3\n".to_owned(), "invalid policy file p.toml"),
        ("[[alow]]\n".to_owned(), "unknown field `alow`"),
    ];
    for (text, want) in cases {
        let got = rejected(text);
        assert!(got.contains(want), "for\n{text}\nwant {want:?} in\n{got}");
    }
    // The duplicate's own position is named too (the allow rule is #1 on line 3).
    let dup = rejected(&cases[11].0);
    assert!(
        dup.starts_with("invalid policy file p.toml, line 3: [[allow]] rule #1:"),
        "{dup}"
    );
}

#[test]
fn attribute_arguments_are_checked() {
    assert_eq!(
        parse_attribute("region=us-east-1").unwrap(),
        ("region".to_owned(), "us-east-1".to_owned())
    );
    assert!(matches!(
        parse_attribute("region"),
        Err(PolicyError::Input(_))
    ));
    assert!(
        parse_attribute("colour=red")
            .unwrap_err()
            .to_string()
            .contains("unknown attribute")
    );
}

const ALLOW_A_B: &str = "[[allow]]\nname = \"a-b\"\nfrom = { spiffe_id = \"spiffe://t.org/a\" }\nto = { spiffe_id = \"spiffe://t.org/b\" }\n";

#[test]
fn reload_replaces_a_good_file_and_keeps_the_last_good_on_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, ALLOW_A_B).unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = PolicyStore::load(&path, metrics.clone()).unwrap();
    let (a, b, c) = (
        id("spiffe://t.org/a"),
        id("spiffe://t.org/b"),
        id("spiffe://t.org/c"),
    );
    assert!(store.current().allows(&a, &b, &[]));
    assert_eq!(store.reload(false).unwrap(), Reload::Unchanged);

    // A bad edit: rejected, the old policy stays, and the error names the file and line.
    std::fs::write(&path, format!("{ALLOW_A_B}\n[[allow]]\nname = \"a-c\"\nfrom = {{ spiffe_id = \"spiffe://t.org/a\" }}\nto = {{ spiffe_id = \"not an id\" }}\n")).unwrap();
    let err = store.reload(false).unwrap_err().to_string();
    assert!(
        err.contains("policy.toml, line 6: [[allow]] rule #2 \"a-c\": to: spiffe_id \"not an id\""),
        "{err}"
    );
    assert!(store.current().allows(&a, &b, &[]));
    assert!(!store.current().allows(&a, &c, &[]));
    // The same bad text is not reported again every second.
    assert_eq!(store.reload(false).unwrap(), Reload::Unchanged);
    // A forced reload (SIGHUP) re-reads and reports it again.
    assert!(store.reload(true).is_err());

    // A good edit replaces the policy.
    std::fs::write(&path, ALLOW_A_B.replace("/b", "/c")).unwrap();
    assert_eq!(store.reload(false).unwrap(), Reload::Replaced);
    assert!(store.current().allows(&a, &c, &[]));
    assert!(!store.current().allows(&a, &b, &[]));

    // A deleted file keeps the policy too.
    std::fs::remove_file(&path).unwrap();
    assert!(store.reload(false).is_err());
    assert!(store.current().allows(&a, &c, &[]));

    let text = metrics.encode();
    assert!(
        text.contains("sigil_proxy_policy_reloads_total{result=\"error\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("sigil_proxy_policy_reloads_total{result=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("sigil_proxy_policy_rules 1"), "{text}");
}

#[test]
fn a_bad_first_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[[allow]]\nname = 1\n").unwrap();
    let err = PolicyStore::load(&path, Arc::new(Metrics::default())).unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { .. }), "{err}");
    let err = PolicyStore::load(
        &dir.path().join("missing.toml"),
        Arc::new(Metrics::default()),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("cannot read policy file"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_watcher_picks_up_changes_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, ALLOW_A_B).unwrap();
    let store = Arc::new(PolicyStore::load(&path, Arc::new(Metrics::default())).unwrap());
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = store.clone().watch(cancel.clone());
    let (a, c) = (id("spiffe://t.org/a"), id("spiffe://t.org/c"));
    std::fs::write(&path, ALLOW_A_B.replace("/b", "/c")).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // Let the watcher task run its tick.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(store.current().allows(&a, &c, &[]));
    cancel.cancel();
    task.await.unwrap();
}
