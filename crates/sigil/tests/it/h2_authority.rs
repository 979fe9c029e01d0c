//! Issue #12: every gRPC stack's `:authority` over a Unix socket reaches the
//! services. grpc-go sends `localhost`, gRPC C-core (py-spiffe and the C++,
//! Ruby, PHP, C# libraries) the percent-encoded socket path, grpc-java the
//! raw path; h2 alone resets the stream for the last two. Each form is sent
//! here over raw HTTP/2 frames (no gRPC library would send them all) to the
//! Workload API, the SDS service and the admin socket, and each must get a
//! gRPC answer, not RST_STREAM.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{PROMPT, cluster_with_me};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What came back for stream 1.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the codes are read in failure messages, through Debug"
)]
enum Answer {
    /// The server reset the stream (the bug) with this error code.
    Reset(u32),
    /// The server closed the connection.
    GoAway(u32),
    /// Response headers (and trailers), and whether a message arrived.
    Response {
        fields: Vec<(String, String)>,
        message: bool,
    },
}

impl Answer {
    fn field(&self, name: &str) -> Option<&str> {
        match self {
            Answer::Response { fields, .. } => fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = len[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// HPACK "literal without indexing, new name", raw strings (RFC 7541 §6.2.2),
/// lengths below 127.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for s in [name, value] {
        out.push(u8::try_from(s.len()).unwrap());
        out.extend(s);
    }
}

/// Calls `path` on a Unix socket with a hand-written HTTP/2 request whose
/// `:authority` is `authority` (absent for `None`), sending `message` as the
/// one gRPC message; returns once the answer's first message, end of
/// stream, reset or GOAWAY arrived.
async fn call(
    socket: &Path,
    authority: Option<&[u8]>,
    path: &str,
    extra: &[(&str, &str)],
    message: &[u8],
) -> Answer {
    let mut conn = UnixStream::connect(socket).await.unwrap();
    let mut block = vec![];
    literal(b":method", b"POST", &mut block);
    literal(b":scheme", b"http", &mut block);
    literal(b":path", path.as_bytes(), &mut block);
    if let Some(a) = authority {
        literal(b":authority", a, &mut block);
    }
    literal(b"content-type", b"application/grpc", &mut block);
    literal(b"te", b"trailers", &mut block);
    for (n, v) in extra {
        literal(n.as_bytes(), v.as_bytes(), &mut block);
    }
    let mut grpc = vec![0];
    grpc.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
    grpc.extend(message);
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &block));
    out.extend(frame(DATA, END_STREAM, 1, &grpc));
    conn.write_all(&out).await.unwrap();
    tokio::time::timeout(PROMPT, read_answer(&mut conn))
        .await
        .expect("an answer in time")
}

async fn read_answer(conn: &mut UnixStream) -> Answer {
    let mut decoder = loona_hpack::Decoder::new();
    let mut fields = vec![];
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await.unwrap();
        let code = || u32::from_be_bytes(payload[..4].try_into().unwrap());
        match (kind, stream) {
            (SETTINGS, 0) if flags & 0x1 == 0 => {
                conn.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
            }
            (GOAWAY, 0) => {
                return Answer::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            (RST_STREAM, 1) => return Answer::Reset(code()),
            (HEADERS, 1) => {
                assert_ne!(flags & END_HEADERS, 0, "the server's headers fit one frame");
                for (n, v) in decoder.decode(&payload).unwrap() {
                    fields.push((
                        String::from_utf8(n).unwrap(),
                        String::from_utf8_lossy(&v).into_owned(),
                    ));
                }
                if flags & END_STREAM != 0 {
                    return Answer::Response {
                        fields,
                        message: false,
                    };
                }
            }
            (DATA, 1) if !payload.is_empty() => {
                return Answer::Response {
                    fields,
                    message: true,
                };
            }
            _ => {}
        }
    }
}

/// The `:authority` forms of the gRPC stacks, for a socket at `socket`.
fn forms(socket: &Path) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let raw = socket.to_str().unwrap();
    // gRPC C-core: the path without its leading '/', '/' percent-encoded.
    let c_core = raw.trim_start_matches('/').replace('/', "%2F");
    vec![
        ("grpc-go", Some(b"localhost".to_vec())),
        ("grpc-java", Some(raw.as_bytes().to_vec())),
        ("gRPC C-core", Some(c_core.into_bytes())),
        ("empty", Some(vec![])),
        ("absent", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_stacks_authority_reaches_the_services() {
    let (cluster, _me) = cluster_with_me(Default::default()).await;
    let agent_socket = cluster.agent_config.socket_path.clone();
    let admin_socket = cluster.admin_socket();
    let workload = [("workload.spiffe.io", "true")];
    for (stack, authority) in forms(&agent_socket) {
        let authority = authority.as_deref();
        // Workload API, a stream: its first message is the bundle.
        let answer = call(
            &agent_socket,
            authority,
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            &workload,
            &[],
        )
        .await;
        assert_eq!(answer.field(":status"), Some("200"), "{stack}: {answer:?}");
        assert!(
            matches!(answer, Answer::Response { message: true, .. }),
            "{stack}: {answer:?}"
        );
        // Without the security header the Workload API refuses the call,
        // with a gRPC status.
        let answer = call(
            &agent_socket,
            authority,
            "/SpiffeWorkloadAPI/FetchJWTBundles",
            &[],
            &[],
        )
        .await;
        assert_eq!(
            answer.field("grpc-status"),
            Some("3"),
            "{stack}: {answer:?}"
        );
        // SDS, unary: an empty DiscoveryRequest names no resource.
        let answer = call(
            &agent_socket,
            authority,
            "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
            &[],
            &[],
        )
        .await;
        assert_eq!(answer.field(":status"), Some("200"), "{stack}: {answer:?}");
        assert!(
            answer.field("grpc-status").is_some()
                || matches!(answer, Answer::Response { message: true, .. }),
            "{stack}: {answer:?}"
        );
    }
    for (stack, authority) in forms(&admin_socket) {
        let answer = call(
            &admin_socket,
            authority.as_deref(),
            "/sigil.server.v1.AdminApi/ListEntries",
            &[],
            &[],
        )
        .await;
        assert_eq!(
            answer.field(":status"),
            Some("200"),
            "admin, {stack}: {answer:?}"
        );
        assert!(
            matches!(answer, Answer::Response { message: true, .. }),
            "admin, {stack}: {answer:?}"
        );
    }
    cluster.shutdown().await;
}
