#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use loona_hpack::{Decoder, Encoder};
use proptest::prelude::*;

use super::*;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// What a server reading the shim's output sees.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Headers {
        stream: u32,
        end_stream: bool,
        priority: Option<[u8; 5]>,
        fields: Fields,
    },
    Other {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

/// Parses a client-to-server byte stream as a server would, with one HPACK
/// decoder for the connection; also checks that no frame exceeds 16 KiB.
fn server_view(bytes: &[u8]) -> Vec<Event> {
    assert_eq!(&bytes[..24], PREFACE);
    let mut rest = &bytes[24..];
    let mut decoder = Decoder::new();
    let mut events = vec![];
    let mut open: Option<Block> = None;
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        assert!(len <= MAX_FRAME, "frame of {len} bytes");
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match kind {
            HEADERS => {
                assert!(open.is_none());
                let block = open_block(&[0, 0, 0, kind, flags, 0, 0, 0, 0], payload).unwrap();
                open = Some(Block {
                    stream_id: stream,
                    ..block
                });
            }
            CONTINUATION => open.as_mut().unwrap().fragment.extend_from_slice(payload),
            _ => {
                assert!(open.is_none());
                events.push(Event::Other {
                    kind,
                    flags,
                    stream,
                    payload: payload.to_vec(),
                });
                continue;
            }
        }
        if flags & END_HEADERS != 0 {
            let block = open.take().unwrap();
            events.push(Event::Headers {
                stream: block.stream_id,
                end_stream: block.end_stream,
                priority: block.priority,
                fields: decoder.decode(&block.fragment).unwrap(),
            });
        }
    }
    assert!(open.is_none());
    events
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    write_frame(kind, flags, stream, &[payload], &mut out);
    out
}

fn request(authority: &[u8]) -> Fields {
    [
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"workload.spiffe.io", b"true"),
    ]
    .iter()
    .map(|(n, v)| (n.to_vec(), v.to_vec()))
    .collect()
}

fn encode(encoder: &mut Encoder<'_>, fields: &Fields) -> Vec<u8> {
    encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
}

fn rewrite_all(input: &[u8]) -> Result<Vec<u8>, ShimError> {
    let mut rw = Rewriter::default();
    let mut out = vec![];
    rw.push(input, &mut out)?;
    Ok(out)
}

fn with_localhost(mut fields: Fields) -> Fields {
    for (n, v) in &mut fields {
        if n == b":authority" && !authority_is_valid(v) {
            *v = b"localhost".to_vec();
        }
    }
    fields
}

const SETTINGS: u8 = 0x4;
const DATA: u8 = 0x0;

#[test]
fn valid_authorities_pass_byte_for_byte() {
    let mut enc = Encoder::new();
    let mut input = PREFACE.to_vec();
    input.extend(frame(SETTINGS, 0, 0, &[]));
    for (stream, authority) in [(1, &b"localhost"[..]), (3, b"example.org:443")] {
        let block = encode(&mut enc, &request(authority));
        input.extend(frame(HEADERS, END_HEADERS, stream, &block));
        input.extend(frame(DATA, END_STREAM, stream, b"\0\0\0\0\0"));
    }
    // An absent :authority is valid HTTP/2 too.
    let mut no_authority = request(b"x");
    no_authority.retain(|(n, _)| n != b":authority");
    let block = encode(&mut enc, &no_authority);
    input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &block));
    assert_eq!(rewrite_all(&input).unwrap(), input);
}

#[test]
fn refused_authorities_become_localhost_and_later_blocks_stay_decodable() {
    for authority in [
        &b"tmp%2Fsigil-dev-0%2Fagent.sock"[..],
        b"/run/sigil/agent/api.sock",
        b"",
        b"a b",
    ] {
        assert!(!authority_is_valid(authority));
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        // A valid block first: it passes through, and its dynamic-table
        // entries are then in the server's table as well as the shim's.
        let first = request(b"localhost");
        input.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut enc, &first)));
        let second = request(authority);
        input.extend(frame(HEADERS, END_HEADERS, 3, &encode(&mut enc, &second)));
        // The third refers to the client's table for every field.
        input.extend(frame(HEADERS, END_HEADERS, 5, &encode(&mut enc, &second)));
        let mut rw = Rewriter::default();
        let mut out = vec![];
        rw.push(&input, &mut out).unwrap();
        assert!(rw.is_rewriting());
        let fields: Vec<Fields> = server_view(&out)
            .into_iter()
            .map(|e| match e {
                Event::Headers { fields, .. } => fields,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            fields,
            [
                first,
                with_localhost(second.clone()),
                with_localhost(second)
            ]
        );
        assert_eq!(
            fields[1][3],
            (b":authority".to_vec(), b"localhost".to_vec())
        );
    }
}

#[test]
fn rfc7541_huffman_example_is_decoded() {
    // RFC 7541 C.4.1 (Huffman-coded :authority www.example.com) and C.4.2,
    // which refers to the dynamic-table entry C.4.1 added.
    let c41 = [
        0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90,
        0xf4, 0xff,
    ];
    let c42 = [
        0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
    ];
    // Then a refused authority, so that the shim re-encodes C.4.2's twin.
    let refused = [0x82, 0x86, 0x84, 0x01, 0x03, b'a', b'%', b'b', 0xbe];
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &c41));
    input.extend(frame(HEADERS, END_HEADERS, 3, &refused));
    input.extend(frame(HEADERS, END_HEADERS, 5, &c42));
    let events = server_view(&rewrite_all(&input).unwrap());
    let Event::Headers { fields, .. } = &events[2] else {
        panic!("{events:?}")
    };
    assert_eq!(
        fields,
        &vec![
            (b":method".to_vec(), b"GET".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), b"/".to_vec()),
            (b":authority".to_vec(), b"www.example.com".to_vec()),
            (b"cache-control".to_vec(), b"no-cache".to_vec()),
        ]
    );
    let Event::Headers { fields, .. } = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(fields[3], (b":authority".to_vec(), b"localhost".to_vec()));
    assert_eq!(
        fields[4].0,
        b":authority".to_vec(),
        "C.4.1's entry, resolved"
    );
}

#[test]
fn padding_priority_and_continuations_are_handled() {
    let mut enc = Encoder::new();
    let mut fields = request(b"/run/sigil/agent/api.sock");
    // Large enough to need CONTINUATION frames when re-encoded.
    fields.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
    let block = encode(&mut enc, &fields);
    let (a, b) = block.split_at(10);
    let mut payload = vec![3u8]; // pad length
    payload.extend([0x80, 0, 0, 1, 200]); // exclusive dependency on 1, weight
    payload.extend(a);
    payload.extend([0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &payload));
    let (b1, b2) = b.split_at(b.len() / 2);
    input.extend(frame(CONTINUATION, 0, 3, b1));
    input.extend(frame(CONTINUATION, END_HEADERS, 3, b2));
    // Bounds large enough for the big field.
    let mut rw = Rewriter::new(64 * 1024);
    let mut out = vec![];
    rw.push(&input, &mut out).unwrap();
    assert_eq!(
        server_view(&out),
        [Event::Headers {
            stream: 3,
            end_stream: true,
            priority: Some([0x80, 0, 0, 1, 200]),
            fields: with_localhost(fields),
        }]
    );
}

#[test]
fn any_split_of_the_input_gives_the_same_output() {
    let mut enc = Encoder::new();
    let mut input = PREFACE.to_vec();
    input.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
    let block = encode(&mut enc, &request(b"tmp%2Fa.sock"));
    input.extend(frame(HEADERS, END_HEADERS, 1, &block));
    input.extend(frame(DATA, END_STREAM, 1, &[7; 300]));
    let whole = rewrite_all(&input).unwrap();
    let mut rw = Rewriter::default();
    let mut out = vec![];
    for byte in &input {
        rw.push(std::slice::from_ref(byte), &mut out).unwrap();
    }
    assert_eq!(out, whole);
}

#[test]
fn broken_framing_and_oversized_blocks_end_the_connection() {
    let with = |frames: &[Vec<u8>]| {
        let mut input = PREFACE.to_vec();
        for f in frames {
            input.extend(f);
        }
        rewrite_all(&input)
    };
    assert!(matches!(
        with(&[frame(CONTINUATION, END_HEADERS, 1, &[0x82])]),
        Err(ShimError::Protocol(_))
    ));
    assert!(matches!(
        with(&[frame(HEADERS, 0, 1, &[0x82]), frame(DATA, 0, 1, &[])]),
        Err(ShimError::Protocol(_))
    ));
    assert!(matches!(
        with(&[
            frame(HEADERS, 0, 1, &[0x82]),
            frame(CONTINUATION, 0, 3, &[])
        ]),
        Err(ShimError::Protocol(_))
    ));
    assert!(matches!(
        with(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[5, 0x82])]),
        Err(ShimError::Protocol(_))
    ));
    assert!(matches!(
        with(&[frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0, 0])]),
        Err(ShimError::Protocol(_))
    ));
    // Index 70 is past the static table with an empty dynamic table.
    assert!(matches!(
        with(&[frame(HEADERS, END_HEADERS, 1, &[0x80 | 70])]),
        Err(ShimError::Hpack(_))
    ));
    // A table size update beyond what the server advertised.
    assert!(matches!(
        with(&[frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x3f, 0x82])]),
        Err(ShimError::Hpack(_))
    ));
    // Empty CONTINUATIONs forever: bounded by their frame headers.
    let mut flood = vec![frame(HEADERS, 0, 1, &[0x82])];
    flood.extend(std::iter::repeat_n(frame(CONTINUATION, 0, 1, &[]), 10_000));
    assert_eq!(
        with(&flood),
        Err(ShimError::HeaderBlockTooLarge {
            limit: 2 * DEFAULT_MAX_HEADER_LIST_SIZE
        })
    );
    // Thousands of one-byte Huffman-coded values: refused by counting, before
    // any string is decoded.
    let mut tiny = vec![];
    while tiny.len() + 3 < MAX_FRAME {
        // Literal without indexing, name :path (index 4), value "0" Huffman-coded.
        tiny.extend([0x04, 0x81, 0x07]);
    }
    assert_eq!(
        with(&[frame(HEADERS, END_HEADERS, 1, &tiny)]),
        Err(ShimError::TooManyFields {
            limit: DEFAULT_MAX_HEADER_LIST_SIZE / 32
        })
    );
    // A string running past the block is refused by the count as well.
    assert!(matches!(
        with(&[frame(HEADERS, END_HEADERS, 1, &[0x04, 0x05, b'a'])]),
        Err(ShimError::Hpack(_))
    ));
    // A small block that decodes to a huge list (one dynamic entry, many
    // references to it).
    let mut enc = Encoder::new();
    let mut block = encode(&mut enc, &vec![(b"x-a".to_vec(), vec![b'a'; 3000])]);
    block.extend(std::iter::repeat_n(0x80 | 62, 100));
    assert!(matches!(
        with(&[frame(HEADERS, END_HEADERS, 1, &block)]),
        Err(ShimError::HeaderBlockTooLarge { .. })
    ));
}

#[test]
fn a_client_without_the_http2_preface_is_passed_through() {
    let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(rewrite_all(input).unwrap(), input);
}

/// Header fields a client might send; names are lowercase tokens, values
/// arbitrary bytes (the shim does not judge them).
fn fields_strategy() -> impl Strategy<Value = Fields> {
    let authority = prop_oneof![
        Just(b"localhost".to_vec()),
        Just(b"tmp%2Fsigil%2Fagent.sock".to_vec()),
        Just(b"/run/sigil/api.sock".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..20),
    ];
    let extra = proptest::collection::vec(
        (
            "[a-z][a-z0-9.-]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..40),
        ),
        0..6,
    );
    (authority, extra).prop_map(|(a, extra)| {
        let mut f = request(&a);
        f.extend(extra);
        f
    })
}

proptest! {
    #[test]
    fn header_blocks_round_trip(
        blocks in proptest::collection::vec(fields_strategy(), 1..6),
        chunk in 1usize..200,
    ) {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        for (i, fields) in blocks.iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            input.extend(frame(HEADERS, END_HEADERS, stream, &encode(&mut enc, fields)));
            input.extend(frame(DATA, END_STREAM, stream, &[1, 2, 3]));
        }
        let mut rw = Rewriter::default();
        let mut out = vec![];
        for piece in input.chunks(chunk) {
            rw.push(piece, &mut out).unwrap();
        }
        let seen: Vec<Fields> = server_view(&out)
            .into_iter()
            .filter_map(|e| match e {
                Event::Headers { fields, .. } => Some(fields),
                Event::Other { .. } => None,
            })
            .collect();
        let expected: Vec<Fields> = blocks.into_iter().map(with_localhost).collect();
        prop_assert_eq!(seen, expected);
    }

    #[test]
    fn random_frames_never_panic(
        frames in proptest::collection::vec(
            (0u8..12, any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..64)),
            0..20,
        ),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
        chunk in 1usize..100,
    ) {
        let mut input = PREFACE.to_vec();
        for (kind, flags, stream, payload) in &frames {
            input.extend(frame(*kind, *flags, *stream, payload));
        }
        input.extend(noise);
        let mut rw = Rewriter::default();
        let mut out = vec![];
        for piece in input.chunks(chunk) {
            if rw.push(piece, &mut out).is_err() {
                break;
            }
        }
    }
}
