//! The tunnel over real sockets and real TLS: inbound authorization,
//! header injection, outbound server authentication, rotation, federation,
//! reload, metrics, and `openssl s_client` as an independent client.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{
    FakeApi, PROMPT, Svid, Td, echo_server, http_echo_server, http_get, start_proxy, write_policy,
};

const FRONTEND: &str = "/ns/web/sa/frontend";
const BACKEND: &str = "/ns/backend/sa/api";
const STRANGER: &str = "/ns/web/sa/stranger";

fn policy_text(td: &str) -> String {
    format!(
        r#"
[[allow]]
name = "frontend-to-backend"
from = {{ spiffe_id = "spiffe://{td}/ns/web/sa/frontend" }}
to = {{ spiffe_id = "spiffe://{td}/ns/backend/sa/api" }}
"#
    )
}

/// A TLS client connection to `addr` as `client`, expecting any trusted server.
async fn tls_connect(
    client: &Svid,
    trusted: &[&Td],
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let source = client.source(trusted);
    let cfg = sigil_proxy::tls::client_config(&source, None).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("backend.test").unwrap(), tcp)
        .await
}

/// Sends `msg` and reads the same number of bytes back.
async fn round_trip(s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(PROMPT, s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    buf
}

/// Waits until the metrics text contains `needle`; returns the text.
async fn wait_for_metric(metrics: &sigil_proxy::Metrics, needle: &str) -> String {
    for _ in 0..100 {
        let text = metrics.encode();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{needle} never appeared in\n{}", metrics.encode());
}

/// Reads until EOF or error; returns what arrived.
async fn read_until_closed(s: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PROMPT, s.read_to_end(&mut out))
        .await
        .expect("the connection is closed promptly");
    out
}

struct Backend {
    api: FakeApi,
    proxy: sigil_proxy::ProxyHandle,
    _dir: tempfile::TempDir,
}

/// A backend proxy (inbound only) in front of `app`, for `td`.
async fn backend(td: &Td, svid: &Svid, federated: &[&Td], inbound: &str) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &policy_text(td.name.name()));
    let api = FakeApi::start(Some(svid.response(federated))).await;
    let proxy = start_proxy(
        dir.path(),
        &api,
        &format!("policy_file = \"policy.toml\"\nmetrics_address = \"127.0.0.1:0\"\n{inbound}"),
    )
    .await;
    Backend {
        api,
        proxy,
        _dir: dir,
    }
}

fn tcp_inbound(app: std::net::SocketAddr) -> String {
    format!("[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward_to = \"{app}\"\n")
}

fn http_inbound(app: std::net::SocketAddr) -> String {
    format!(
        "[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nforward_to = \"{app}\"\nprotocol = \"http\"\ncaller_header = \"X-SPIFFE-ID\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_caller_reaches_the_app_and_a_denied_one_is_closed() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let b = backend(&td, &td.svid(BACKEND), &[], &tcp_inbound(app)).await;
    let addr = b.proxy.inbound[0];
    assert_eq!(b.proxy.source.identity().spiffe_id, td.id(BACKEND));

    let mut ok = tls_connect(&td.svid(FRONTEND), &[], addr).await.unwrap();
    assert_eq!(
        round_trip(&mut ok, b"hello backend").await,
        b"hello backend"
    );

    // The stranger completes the handshake (its SVID is valid) but the
    // policy denies it: the proxy closes without forwarding anything.
    let mut denied = tls_connect(&td.svid(STRANGER), &[], addr).await.unwrap();
    let _ = denied.write_all(b"hello?").await;
    assert!(read_until_closed(&mut denied).await.is_empty());

    // A client whose SVID comes from another CA does not get through the handshake.
    let rogue = Td::new("acme.com");
    let failed = async {
        let mut s = tls_connect(&rogue.svid(FRONTEND), &[], addr).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(())
    };
    assert!(failed.await.is_err());

    let text = wait_for_metric(
        &b.proxy.metrics,
        "sigil_proxy_connections_total{direction=\"inbound\",listener=\"api\",outcome=\"tls_error\"} 1",
    )
    .await;
    assert!(
        text.contains(
            "sigil_proxy_decisions_total{decision=\"allowed\",rule=\"frontend-to-backend\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("sigil_proxy_decisions_total{decision=\"denied\",rule=\"<default>\"} 1"),
        "{text}"
    );
    // The same figures over HTTP.
    let mut m = TcpStream::connect(b.proxy.metrics_address.unwrap())
        .await
        .unwrap();
    let resp = http_get(&mut m, "").await.replace("GET /hello", "");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let mut m = TcpStream::connect(b.proxy.metrics_address.unwrap())
        .await
        .unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_until_closed(&mut m).await;
    assert!(String::from_utf8_lossy(&resp).contains("sigil_proxy_decisions_total"));
    b.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_injects_the_caller_id_and_strips_forged_copies() {
    let td = Td::new("acme.com");
    let app = http_echo_server().await;
    let b = backend(&td, &td.svid(BACKEND), &[], &http_inbound(app)).await;
    let addr = b.proxy.inbound[0];

    let mut s = tls_connect(&td.svid(FRONTEND), &[], addr).await.unwrap();
    let resp = http_get(
        &mut s,
        "x-spiffe-id: spiffe://acme.com/ns/admin/sa/root\r\nX-Spiffe-Id: forged\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("x-spiffe-id: spiffe://acme.com/ns/web/sa/frontend\nversion: HTTP/1.1\n"),
        "{resp}"
    );
    assert!(
        !resp.contains("admin") && !resp.contains("forged"),
        "{resp}"
    );

    // Several requests on one connection each get the header.
    let mut s = tls_connect(&td.svid(FRONTEND), &[], addr).await.unwrap();
    for i in 0..3 {
        let req = format!("POST /n HTTP/1.1\r\nhost: app\r\ncontent-length: 1\r\n\r\n{i}");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(PROMPT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.contains("x-spiffe-id: spiffe://acme.com/ns/web/sa/frontend\n"),
            "{text}"
        );
        assert!(text.contains(&format!("body: {i}\n")), "{text}");
    }

    // HTTP/2 (prior knowledge inside the tunnel) gets the header too.
    let tls = tls_connect(&td.svid(FRONTEND), &[], addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("https://backend.test/h2")
        .header("x-spiffe-id", "spiffe://acme.com/forged")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("x-spiffe-id: spiffe://acme.com/ns/web/sa/frontend\nversion: HTTP/2.0\n"),
        "{body}"
    );

    // A denied caller gets a 403 with a short explanation.
    let mut s = tls_connect(&td.svid(STRANGER), &[], addr).await.unwrap();
    let resp = http_get(&mut s, "").await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden"), "{resp}");
    assert!(
        resp.ends_with("403 Forbidden: spiffe://acme.com/ns/web/sa/stranger is not allowed to call spiffe://acme.com/ns/backend/sa/api\n"),
        "{resp}"
    );
    b.proxy.shutdown().await;
}

/// A frontend proxy with one outbound listener to `upstream`.
async fn frontend(
    td: &Td,
    svid: &Svid,
    upstream: std::net::SocketAddr,
    expect: Option<&str>,
    protocol: &str,
    policy: Option<&str>,
) -> (FakeApi, sigil_proxy::ProxyHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = String::new();
    if let Some(p) = policy {
        write_policy(dir.path(), p);
        cfg.push_str("policy_file = \"policy.toml\"\n");
    }
    cfg.push_str(&format!(
        "[[outbound]]\nname = \"to-backend\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nprotocol = \"{protocol}\"\n"
    ));
    if let Some(e) = expect {
        cfg.push_str(&format!("upstream_spiffe_id = \"{e}\"\n"));
    }
    let api = FakeApi::start(Some(svid.response(&[]))).await;
    let proxy = start_proxy(dir.path(), &api, &cfg).await;
    let _ = td;
    (api, proxy, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_an_upstream_with_the_wrong_id() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let b = backend(&td, &td.svid(BACKEND), &[], &tcp_inbound(app)).await;
    let upstream = b.proxy.inbound[0];
    let backend_id = td.id(BACKEND).to_string();

    // Right ID: frontend app → outbound → inbound → echo app.
    let (_api, f, _d) = frontend(
        &td,
        &td.svid(FRONTEND),
        upstream,
        Some(&backend_id),
        "tcp",
        None,
    )
    .await;
    let mut app_conn = TcpStream::connect(f.outbound[0]).await.unwrap();
    assert_eq!(
        round_trip(&mut app_conn, b"through both proxies").await,
        b"through both proxies"
    );
    drop(app_conn);

    // Wrong expected ID: the handshake is aborted, the app's connection closed.
    let (_api2, f2, _d2) = frontend(
        &td,
        &td.svid(FRONTEND),
        upstream,
        Some("spiffe://acme.com/ns/db/sa/postgres"),
        "tcp",
        None,
    )
    .await;
    let mut app_conn = TcpStream::connect(f2.outbound[0]).await.unwrap();
    let _ = app_conn.write_all(b"secret").await;
    assert!(read_until_closed(&mut app_conn).await.is_empty());
    wait_for_metric(&f2.metrics, "outcome=\"upstream_refused\"} 1").await;

    // In HTTP mode the app gets a 502 that says why.
    let (_api3, f3, _d3) = frontend(
        &td,
        &td.svid(FRONTEND),
        upstream,
        Some("spiffe://acme.com/ns/db/sa/postgres"),
        "http",
        None,
    )
    .await;
    let mut app_conn = TcpStream::connect(f3.outbound[0]).await.unwrap();
    let resp = http_get(&mut app_conn, "").await;
    assert!(resp.starts_with("HTTP/1.1 502 Bad Gateway"), "{resp}");
    assert!(
        resp.contains("the upstream presented spiffe://acme.com/ns/backend/sa/api, not the expected spiffe://acme.com/ns/db/sa/postgres"),
        "{resp}"
    );

    // An upstream that is not a SPIFFE server at all (the echo app) is refused too.
    let (_api4, f4, _d4) =
        frontend(&td, &td.svid(FRONTEND), app, Some(&backend_id), "tcp", None).await;
    let mut app_conn = TcpStream::connect(f4.outbound[0]).await.unwrap();
    assert!(read_until_closed(&mut app_conn).await.is_empty());

    // The stranger's outbound reaches the backend's proxy, which denies it.
    let (_api5, f5, _d5) = frontend(
        &td,
        &td.svid(STRANGER),
        upstream,
        Some(&backend_id),
        "tcp",
        None,
    )
    .await;
    let mut app_conn = TcpStream::connect(f5.outbound[0]).await.unwrap();
    let _ = app_conn.write_all(b"hi").await;
    assert!(read_until_closed(&mut app_conn).await.is_empty());

    for p in [f, f2, f3, f4, f5, b.proxy] {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_without_an_expected_id_asks_the_policy() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let b = backend(&td, &td.svid(BACKEND), &[], &tcp_inbound(app)).await;
    let upstream = b.proxy.inbound[0];
    let policy = policy_text("acme.com");
    let (_a, f, _d) = frontend(
        &td,
        &td.svid(FRONTEND),
        upstream,
        None,
        "tcp",
        Some(&policy),
    )
    .await;
    let mut c = TcpStream::connect(f.outbound[0]).await.unwrap();
    assert_eq!(round_trip(&mut c, b"ok").await, b"ok");

    // A policy that does not let the frontend call the backend: refused with a 403 in HTTP mode.
    let other = policy.replace("ns/backend/sa/api", "ns/backend/sa/other");
    let (_a2, f2, _d2) = frontend(
        &td,
        &td.svid(FRONTEND),
        upstream,
        None,
        "http",
        Some(&other),
    )
    .await;
    let mut c = TcpStream::connect(f2.outbound[0]).await.unwrap();
    let resp = http_get(&mut c, "").await;
    assert!(resp.starts_with("HTTP/1.1 403 Forbidden"), "{resp}");
    assert!(
        resp.contains(
            "spiffe://acme.com/ns/web/sa/frontend may not call spiffe://acme.com/ns/backend/sa/api"
        ),
        "{resp}"
    );
    wait_for_metric(
        &f2.metrics,
        "sigil_proxy_decisions_total{decision=\"denied\",rule=\"<default>\"} 1",
    )
    .await;
    for p in [f, f2, b.proxy] {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_established_connections_and_new_ones_get_the_new_svid() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let first = td.svid(BACKEND);
    let b = backend(&td, &first, &[], &tcp_inbound(app)).await;
    let addr = b.proxy.inbound[0];
    let client = td.svid(FRONTEND);

    let serial_of = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        let cert = &s.get_ref().1.peer_certificates().unwrap()[0];
        sigil_svid::x509::cert_info(cert).unwrap().serial_hex
    };
    let mut long_lived = tls_connect(&client, &[], addr).await.unwrap();
    assert_eq!(serial_of(&long_lived), first.serial());
    assert_eq!(round_trip(&mut long_lived, b"before").await, b"before");

    // The agent rotates the backend's SVID.
    let second = td.svid(BACKEND);
    let mut updates = b.proxy.source.subscribe();
    b.api.push(second.response(&[]));
    tokio::time::timeout(
        PROMPT,
        updates.wait_for(|i| i.serial_hex == second.serial()),
    )
    .await
    .expect("the proxy sees the rotation")
    .unwrap();

    assert_eq!(
        round_trip(&mut long_lived, b"after rotation").await,
        b"after rotation"
    );
    let mut fresh = tls_connect(&client, &[], addr).await.unwrap();
    assert_eq!(serial_of(&fresh), second.serial());
    assert_eq!(round_trip(&mut fresh, b"new").await, b"new");

    // A CA rotation: the bundle gains the new CA, a client with an SVID from it gets in.
    let next_ca = Td::new("acme.com");
    let mut with_both = second.response(&[]);
    with_both.svids[0].bundle = [td.ca.cert_der(), next_ca.ca.cert_der()].concat();
    b.api.push(with_both);
    let new_client = next_ca.svid(FRONTEND);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(mut s) = tls_connect(&new_client, &[&td], addr).await
            && s.write_all(b"z").await.is_ok()
        {
            let mut buf = [0u8; 1];
            if tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ok,
        "a client of the new CA is accepted after the bundle update"
    );
    assert_eq!(round_trip(&mut long_lived, b"still").await, b"still");

    // The Workload API goes away: the proxy keeps serving with what it holds.
    b.api.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = tls_connect(&client, &[], addr).await.unwrap();
    assert_eq!(round_trip(&mut s, b"agent down").await, b"agent down");
    b.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_callers_are_trusted_through_federated_bundles() {
    let td = Td::new("acme.com");
    let partner = Td::new("partner.org");
    let app = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "[[allow]]\nname = \"partner\"\nfrom = { trust_domain = \"partner.org\" }\nto = { id_prefix = \"spiffe://acme.com/ns/backend\" }\n",
    );
    // First without the partner's bundle: the partner cannot even finish the handshake.
    let svid = td.svid(BACKEND);
    let api = FakeApi::start(Some(svid.response(&[]))).await;
    let proxy = start_proxy(
        dir.path(),
        &api,
        &format!("policy_file = \"policy.toml\"\n{}", tcp_inbound(app)),
    )
    .await;
    let addr = proxy.inbound[0];
    let caller = partner.svid("/checkout");
    let attempt = |caller: &Svid| {
        let caller_src = caller.source(&[&td]);
        async move {
            let cfg = sigil_proxy::tls::client_config(&caller_src, None).unwrap();
            let tcp = TcpStream::connect(addr).await?;
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("x").unwrap(), tcp)
                .await?;
            s.write_all(b"fed").await?;
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        }
    };
    assert!(attempt(&caller).await.is_err());

    api.push(svid.response(&[&partner]));
    let mut updates = proxy.source.subscribe();
    tokio::time::timeout(PROMPT, updates.wait_for(|i| i.trust_domains.len() == 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        proxy.source.identity().trust_domains,
        ["acme.com", "partner.org"]
    );
    assert_eq!(&attempt(&caller).await.unwrap(), b"fed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_attributes_feed_the_policy_and_reload_applies_to_new_connections() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let rule = |region: &str| {
        format!(
            "[[allow]]\nname = \"web-in-{region}\"\nfrom = {{ id_prefix = \"spiffe://acme.com/ns/web\" }}\nto = {{ trust_domain = \"acme.com\" }}\nwhen = {{ region = \"{region}\" }}\n"
        )
    };
    std::fs::write(&policy, rule("us-east-1")).unwrap();
    let api = FakeApi::start(Some(td.svid(BACKEND).response(&[]))).await;
    let proxy = start_proxy(
        dir.path(),
        &api,
        &format!("policy_file = \"policy.toml\"\n{}", tcp_inbound(app)),
    )
    .await;
    let addr = proxy.inbound[0];
    let us = td.svid_with(FRONTEND, &[("region", "us-east-1")]);
    let eu = td.svid_with(FRONTEND, &[("region", "eu-west-1")]);

    let mut s = tls_connect(&us, &[], addr).await.unwrap();
    assert_eq!(round_trip(&mut s, b"us").await, b"us");
    let mut e = tls_connect(&eu, &[], addr).await.unwrap();
    let _ = e.write_all(b"eu").await;
    assert!(read_until_closed(&mut e).await.is_empty());

    // A bad edit is rejected and the last good policy stays in force.
    std::fs::write(&policy, "[[allow]]\nname = \"broken\"\n").unwrap();
    assert!(proxy.policy.reload(false).is_err());
    let mut s2 = tls_connect(&us, &[], addr).await.unwrap();
    assert_eq!(round_trip(&mut s2, b"still us").await, b"still us");

    // A good edit is picked up by the watcher (polling each second).
    std::fs::write(&policy, rule("eu-west-1")).unwrap();
    let mut switched = false;
    for _ in 0..60 {
        if proxy
            .policy
            .current()
            .rules()
            .first()
            .is_some_and(|r| r.name == "web-in-eu-west-1")
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the watcher reloads the policy within seconds");
    let mut e = tls_connect(&eu, &[], addr).await.unwrap();
    assert_eq!(round_trip(&mut e, b"eu now").await, b"eu now");
    let mut u = tls_connect(&us, &[], addr).await.unwrap();
    let _ = u.write_all(b"us?").await;
    assert!(read_until_closed(&mut u).await.is_empty());
    // Connections opened under the old policy are not re-evaluated.
    assert_eq!(round_trip(&mut s, b"old conn").await, b"old conn");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_spiffe_id_picks_among_several_svids() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &policy_text("acme.com"));
    let other = td.svid("/ns/other/sa/x");
    let backend = td.svid(BACKEND);
    let mut resp = other.response(&[]);
    resp.svids.push(backend.message());
    let api = FakeApi::start(Some(resp)).await;
    let proxy = start_proxy(
        dir.path(),
        &api,
        &format!(
            "spiffe_id = \"spiffe://acme.com{BACKEND}\"\npolicy_file = \"policy.toml\"\n{}",
            tcp_inbound(app)
        ),
    )
    .await;
    assert_eq!(proxy.source.identity().spiffe_id, td.id(BACKEND));
    let mut s = tls_connect(&td.svid(FRONTEND), &[], proxy.inbound[0])
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"picked").await, b"picked");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_waits_for_an_svid_before_listening() {
    let td = Td::new("acme.com");
    let api = FakeApi::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "workload_api_socket = {:?}\n[[outbound]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nupstream_spiffe_id = \"spiffe://acme.com/x\"\n",
        api.socket
    );
    let cfg = sigil_proxy::ProxyConfig::parse(&text, &dir.path().join("p.toml"), None).unwrap();
    let starting = tokio::spawn(sigil_proxy::start(cfg));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!starting.is_finished(), "no SVID yet: still waiting");
    api.push(td.svid("/x").response(&[]));
    let proxy = tokio::time::timeout(PROMPT, starting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(proxy.source.identity().spiffe_id, td.id("/x"));
    proxy.shutdown().await;
}

/// Runs `openssl s_client` against `addr` with `args`, feeding `stdin`.
fn s_client(addr: std::net::SocketAddr, args: &[&str], stdin: &[u8]) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "backend.test",
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        // Give the server time to answer before stdin closes the session.
        std::thread::sleep(Duration::from_millis(1500));
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_needs_a_client_certificate() {
    let td = Td::new("acme.com");
    let app = echo_server().await;
    let b = backend(&td, &td.svid(BACKEND), &[], &tcp_inbound(app)).await;
    let addr = b.proxy.inbound[0];

    let out = tokio::task::spawn_blocking(move || s_client(addr, &[], b"ping\n"))
        .await
        .unwrap();
    assert!(
        out.1.contains("certificate required") || out.1.contains("handshake failure"),
        "without a certificate the server must refuse: {}",
        out.1
    );
    assert!(
        !out.1.contains("ping"),
        "nothing reaches the app: {}",
        out.1
    );

    // With the frontend's SVID as PEM files, openssl gets through to the app.
    let dir = tempfile::tempdir().unwrap();
    let fe = td.svid(FRONTEND);
    let cert = dir.path().join("svid.pem");
    let key = dir.path().join("svid.key");
    let ca = dir.path().join("bundle.pem");
    std::fs::write(&cert, sigil_svid::pem::certs_to_pem(&fe.chain)).unwrap();
    std::fs::write(&key, fe.key.to_pem().as_bytes()).unwrap();
    std::fs::write(
        &ca,
        sigil_svid::pem::certs_to_pem(std::slice::from_ref(&fe.ca_der)),
    )
    .unwrap();
    let args = [
        "-cert".to_owned(),
        cert.display().to_string(),
        "-key".to_owned(),
        key.display().to_string(),
        "-CAfile".to_owned(),
        ca.display().to_string(),
        "-quiet".to_owned(),
        // -quiet implies -ign_eof; close when the input ends.
        "-no_ign_eof".to_owned(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s_client(addr, &args, b"ping through openssl\n")
    })
    .await
    .unwrap();
    assert!(out.1.contains("ping through openssl"), "{}", out.1);
    b.proxy.shutdown().await;
}

/// An app that accepts an HTTP/1.1 upgrade to "echo", reports the caller
/// header it saw in the 101 response, then echoes raw bytes.
async fn upgrade_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_lowercase();
                let caller = text
                    .lines()
                    .find_map(|l| l.strip_prefix("x-spiffe-id: "))
                    .unwrap_or("none")
                    .to_owned();
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\nx-seen-caller: {caller}\r\n\r\n"
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upgrades_pass_through_with_the_caller_header() {
    let td = Td::new("acme.com");
    let app = upgrade_app().await;
    let b = backend(&td, &td.svid(BACKEND), &[], &http_inbound(app)).await;
    let mut s = tls_connect(&td.svid(FRONTEND), &[], b.proxy.inbound[0])
        .await
        .unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: echo\r\nx-spiffe-id: forged\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(PROMPT, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("x-seen-caller: spiffe://acme.com/ns/web/sa/frontend\r\n"),
        "{head}"
    );
    assert_eq!(
        round_trip(&mut s, b"raw bytes after the upgrade").await,
        b"raw bytes after the upgrade"
    );
    b.proxy.shutdown().await;
}

/// An outbound listener whose upstream name resolves to the listener itself
/// refuses the connection instead of opening another to itself, and another
/// from that one, without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_the_listener_itself_is_refused_not_looped() {
    let td = Td::new("acme.com");
    let dir = tempfile::tempdir().unwrap();
    // A name, not the address: the config check cannot see it, only the
    // connection can.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = format!(
        "[[outbound]]\nname = \"loop\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"localhost:{port}\"\nupstream_spiffe_id = \"spiffe://acme.com/x\"\n"
    );
    let api = FakeApi::start(Some(td.svid(FRONTEND).response(&[]))).await;
    let proxy = start_proxy(dir.path(), &api, &cfg).await;
    let mut app_conn = TcpStream::connect(proxy.outbound[0]).await.unwrap();
    assert!(read_until_closed(&mut app_conn).await.is_empty());
    wait_for_metric(&proxy.metrics, "outcome=\"upstream_unreachable\"} 1").await;
    // The refused connection is counted before its gauge drops: wait for
    // both. A loop would keep connections open, and this wait would fail.
    let text = wait_for_metric(
        &proxy.metrics,
        "sigil_proxy_active_connections{direction=\"outbound\"} 0",
    )
    .await;
    // Give a loop time to show itself: still one connection in all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text_after = proxy.metrics.encode();
    let outbound_lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("direction=\"outbound\"") && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(outbound_lines(&text), outbound_lines(&text_after));
    assert!(
        text_after.contains("outcome=\"upstream_unreachable\"} 1"),
        "{text_after}"
    );
    proxy.shutdown().await;
}
