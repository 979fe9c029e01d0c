//! `ClusterFederatedTrustDomain` resources → federation relationships: the
//! pure rendering and planning, and the admin calls against a real server.

use std::sync::Arc;

use sigil_k8s_controller::crd::BundleEndpointProfileSpec;
use sigil_k8s_controller::federation::{
    finish_status, plan_federation, record_result, render_federation,
};
use sigil_k8s_controller::{ClusterFederatedTrustDomain, ClusterFederatedTrustDomainSpec};
use sigil_proto::server::v1 as pb;
use sigil_types::TrustDomain;

fn own() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn cftd(
    name: &str,
    td: &str,
    url: &str,
    profile: &str,
    id: Option<&str>,
) -> Arc<ClusterFederatedTrustDomain> {
    let mut r = ClusterFederatedTrustDomain::new(
        name,
        ClusterFederatedTrustDomainSpec {
            trust_domain: td.into(),
            bundle_endpoint_url: url.into(),
            bundle_endpoint_profile: BundleEndpointProfileSpec {
                profile_type: profile.into(),
                endpoint_spiffe_id: id.map(Into::into),
            },
            trust_domain_bundle: None,
        },
    );
    r.metadata.generation = Some(3);
    Arc::new(r)
}

fn existing(td: &str, url: &str, from_config: bool) -> pb::FederationRelationship {
    pb::FederationRelationship {
        trust_domain: td.into(),
        bundle_endpoint_url: url.into(),
        bundle_endpoint_profile: "https_web".into(),
        from_config,
        ..Default::default()
    }
}

#[test]
fn resources_become_creates_updates_and_deletes() {
    let resources = vec![
        cftd(
            "partner",
            "partner.org",
            "https://partner.org/",
            "https_web",
            None,
        ),
        cftd(
            "spire",
            "spire.example",
            "https://spire.example:8443/",
            "https_spiffe",
            Some("spiffe://spire.example/spire/server"),
        ),
        cftd(
            "moved",
            "moved.example",
            "https://new.moved.example/",
            "https_web",
            None,
        ),
    ];
    let mut desired = render_federation(&own(), &resources);
    assert_eq!(desired.relationships.len(), 3);
    let server = vec![
        existing("moved.example", "https://old.moved.example/", false),
        existing("stale.example", "https://stale.example/", false),
        existing("static.example", "https://static.example/", true),
        existing("partner.org", "https://partner.org/", false),
    ];
    let plan = plan_federation(&mut desired, &server);
    let tds = |v: &[pb::FederationRelationship]| -> Vec<String> {
        v.iter().map(|r| r.trust_domain.clone()).collect()
    };
    assert_eq!(tds(&plan.create), vec!["spire.example"]);
    assert_eq!(plan.create[0].bundle_endpoint_profile, "https_spiffe");
    assert_eq!(
        plan.create[0].endpoint_spiffe_id,
        "spiffe://spire.example/spire/server"
    );
    assert_eq!(tds(&plan.update), vec!["moved.example"]);
    assert_eq!(
        plan.update[0].bundle_endpoint_url,
        "https://new.moved.example/"
    );
    assert_eq!(
        plan.delete,
        vec![TrustDomain::new("stale.example").unwrap()],
        "config relationships are never deleted, undeclared dynamic ones are"
    );

    record_result(
        &mut desired,
        "spire.example",
        Some("endpoint refused".into()),
    );
    finish_status(&mut desired);
    let st = |n: &str| desired.status.get(n).unwrap().clone();
    assert!(st("partner").set && st("partner").errors.is_empty());
    assert_eq!(st("partner").observed_generation, Some(3));
    assert!(!st("spire").set);
    assert_eq!(st("spire").errors, vec!["endpoint refused"]);
}

#[test]
fn invalid_duplicate_and_config_owned_resources_report_errors() {
    let resources = vec![
        cftd(
            "a-first",
            "dup.example",
            "https://dup.example/",
            "https_web",
            None,
        ),
        cftd(
            "b-second",
            "dup.example",
            "https://other.example/",
            "https_web",
            None,
        ),
        cftd(
            "no-id",
            "x.example",
            "https://x.example/",
            "https_spiffe",
            None,
        ),
        cftd(
            "plain-http",
            "y.example",
            "http://y.example/",
            "https_web",
            None,
        ),
        cftd(
            "self",
            "example.org",
            "https://example.org/",
            "https_web",
            None,
        ),
        cftd(
            "cfg",
            "static.example",
            "https://static.example/",
            "https_web",
            None,
        ),
    ];
    let mut desired = render_federation(&own(), &resources);
    let plan = plan_federation(
        &mut desired,
        &[existing("static.example", "https://static.example/", true)],
    );
    finish_status(&mut desired);
    assert_eq!(
        plan.create
            .iter()
            .map(|r| r.trust_domain.as_str())
            .collect::<Vec<_>>(),
        vec!["dup.example"]
    );
    assert!(plan.update.is_empty() && plan.delete.is_empty());
    let err = |n: &str| desired.status.get(n).unwrap().errors.join("; ");
    assert!(desired.status["a-first"].set);
    assert!(err("b-second").contains("already declared by ClusterFederatedTrustDomain a-first"));
    assert!(
        err("no-id").contains("endpoint_spiffe_id"),
        "{}",
        err("no-id")
    );
    assert!(
        err("plain-http").contains("https://"),
        "{}",
        err("plain-http")
    );
    assert!(err("self").contains("own trust domain"), "{}", err("self"));
    assert!(err("cfg").contains("config file"), "{}", err("cfg"));
    assert!(!desired.status["cfg"].set);
}

#[test]
fn a_bad_bootstrap_bundle_is_refused_and_a_good_one_sent_on_create_only() {
    let mut bad = (*cftd(
        "p",
        "partner.org",
        "https://partner.org/",
        "https_web",
        None,
    ))
    .clone();
    bad.spec.trust_domain_bundle = Some(r#"{"spiffe_sequence":1}"#.into());
    let d = render_federation(&own(), &[Arc::new(bad)]);
    assert!(d.relationships.is_empty());
    assert!(d.status["p"].errors[0].contains("trustDomainBundle"));

    let mut good = (*cftd(
        "p",
        "partner.org",
        "https://partner.org/",
        "https_web",
        None,
    ))
    .clone();
    good.spec.trust_domain_bundle = Some(r#"{"keys":[]}"#.into());
    let mut d = render_federation(&own(), &[Arc::new(good.clone())]);
    let plan = plan_federation(&mut d, &[]);
    assert_eq!(plan.create[0].trust_domain_bundle_json, r#"{"keys":[]}"#);
    good.spec.bundle_endpoint_url = "https://partner.org/v2".into();
    let mut d = render_federation(&own(), &[Arc::new(good)]);
    let plan = plan_federation(
        &mut d,
        &[existing("partner.org", "https://partner.org/", false)],
    );
    assert_eq!(plan.update.len(), 1);
    assert!(
        plan.update[0].trust_domain_bundle_json.is_empty(),
        "an update must not overwrite fetched bundles with the bootstrap one"
    );
}
