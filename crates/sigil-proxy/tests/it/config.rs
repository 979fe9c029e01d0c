//! The proxy configuration: strict parsing and validation with the key named.

use std::path::Path;

use sigil_proxy::{Protocol, ProxyConfig};

fn parse(text: &str) -> Result<ProxyConfig, String> {
    ProxyConfig::parse(text, Path::new("/etc/sigil/proxy.toml"), None).map_err(|e| e.to_string())
}

const INBOUND: &str = "[[inbound]]\nlisten = \"0.0.0.0:8443\"\nforward_to = \"127.0.0.1:8080\"\n";

#[test]
fn a_full_config_parses_with_defaults_filled_in() {
    let c = ProxyConfig::parse(
        &format!(
            "policy_file = \"policy.toml\"\nmetrics_address = \"127.0.0.1:9102\"\nhandshake_timeout = \"3s\"\n{INBOUND}protocol = \"http\"\ncaller_header = \"X-SPIFFE-ID\"\n[[outbound]]\nname = \"db\"\nlisten = \"[::1]:7002\"\nupstream = \"db.internal:6443\"\nupstream_spiffe_id = \"spiffe://acme.com/db\"\n"
        ),
        Path::new("/etc/sigil/proxy.toml"),
        Some("unix:///tmp/agent.sock".to_owned()),
    )
    .unwrap();
    assert_eq!(c.workload_api_socket, "unix:///tmp/agent.sock");
    assert_eq!(
        c.policy_file.as_deref(),
        Some(Path::new("/etc/sigil/policy.toml"))
    );
    assert_eq!(c.handshake_timeout, std::time::Duration::from_secs(3));
    assert_eq!(c.inbound[0].name, "inbound-0");
    assert_eq!(c.inbound[0].protocol, Protocol::Http);
    assert_eq!(c.inbound[0].caller_header.as_deref(), Some("x-spiffe-id"));
    assert_eq!(c.outbound[0].name, "db");
    assert_eq!(c.outbound[0].protocol, Protocol::Tcp);
    assert_eq!(
        c.outbound[0]
            .upstream_spiffe_id
            .as_ref()
            .map(|i| i.as_str()),
        Some("spiffe://acme.com/db")
    );
    // Without the file's key or the environment, the default socket.
    let c = parse(&format!("policy_file = \"/p.toml\"\n{INBOUND}")).unwrap();
    assert_eq!(c.workload_api_socket, sigil_proxy::config::DEFAULT_SOCKET);
}

#[test]
fn bad_configs_name_the_file_and_key() {
    let cases: &[(String, &str)] = &[
        (format!("policy_file = \"p\"\n{INBOUND}colour = 1\n"), "unknown field `colour`"),
        (format!("polcy_file = \"p\"\n{INBOUND}"), "unknown field `polcy_file`"),
        (INBOUND.to_owned(), "policy_file: required"),
        ("".to_owned(), "inbound: no [[inbound]] or [[outbound]] listener is configured"),
        (
            format!("policy_file = \"p\"\n{INBOUND}caller_header = \"x-id\"\n"),
            "inbound[0].caller_header: needs protocol = \"http\"",
        ),
        (
            format!("policy_file = \"p\"\n{INBOUND}protocol = \"http\"\ncaller_header = \"Host\"\n"),
            "inbound[0].caller_header: \"Host\" is an HTTP framing header",
        ),
        (
            format!("policy_file = \"p\"\n{INBOUND}protocol = \"http\"\ncaller_header = \"bad header\"\n"),
            "is not a valid HTTP header name",
        ),
        (format!("policy_file = \"p\"\n{INBOUND}protocol = \"udp\"\n"), "unknown variant `udp`"),
        (
            format!("policy_file = \"p\"\n{}", INBOUND.replace("0.0.0.0:8443", "localhost:8443")),
            "inbound[0].listen: \"localhost:8443\" is not an IP address with a port",
        ),
        (
            format!("policy_file = \"p\"\n{}", INBOUND.replace("127.0.0.1:8080", "127.0.0.1")),
            "inbound[0].forward_to: \"127.0.0.1\" must be host:port",
        ),
        (
            "[[outbound]]\nlisten = \"10.0.0.1:7000\"\nupstream = \"a:1\"\nupstream_spiffe_id = \"spiffe://a/b\"\n".to_owned(),
            "outbound[0].listen: 10.0.0.1:7000 is not a loopback address",
        ),
        (
            "[[outbound]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"a:1\"\n".to_owned(),
            "policy_file: required",
        ),
        (
            "[[outbound]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"a:1\"\nupstream_spiffe_id = \"a/b\"\n".to_owned(),
            "outbound[0].upstream_spiffe_id: \"a/b\"",
        ),
        (
            "[[outbound]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:7000\"\nupstream_spiffe_id = \"spiffe://a/b\"\n".to_owned(),
            "outbound[0].upstream: 127.0.0.1:7000 is this listener's own address",
        ),
        (
            format!("policy_file = \"p\"\n{INBOUND}{INBOUND}"),
            "inbound[1].name: the address 0.0.0.0:8443 is used twice",
        ),
        (
            format!("workload_api_socket = \"tcp://1.2.3.4:1\"\npolicy_file = \"p\"\n{INBOUND}"),
            "workload_api_socket: Workload API socket address \"tcp://1.2.3.4:1\" must be unix:///absolute/path",
        ),
        (
            format!("handshake_timeout = \"0s\"\npolicy_file = \"p\"\n{INBOUND}"),
            "handshake_timeout: must be more than zero",
        ),
    ];
    for (text, want) in cases {
        let err = parse(text).unwrap_err();
        assert!(
            err.starts_with("invalid proxy config /etc/sigil/proxy.toml"),
            "{err}"
        );
        assert!(err.contains(want), "for\n{text}\nwant {want:?} in\n{err}");
    }
}
