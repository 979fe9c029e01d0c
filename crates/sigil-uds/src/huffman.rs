//! HPACK's Huffman code (RFC 7541 §5.2 and Appendix B), decoding only.
//!
//! Huffman-coded strings are turned into plain ones before the HPACK
//! decoder sees them: this walks a tree built once, a few operations per
//! bit, where the decoder's own Huffman path rebuilds its tables for every
//! string, which a client could make the agent do thousands of times per
//! header block.

use std::sync::OnceLock;

/// Code and bit length of symbols 0 to 255 and of EOS (256), as RFC 7541
/// Appendix B lists them.
const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

/// The end-of-string symbol, which must never appear in a string.
const EOS: u16 = 256;

/// Why a Huffman-coded string is invalid (RFC 7541 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HuffmanError {
    /// The string contains the EOS symbol.
    #[error("EOS symbol inside a Huffman-coded string")]
    Eos,
    /// The padding is longer than 7 bits or not the most significant bits
    /// of EOS (all ones).
    #[error("invalid Huffman padding")]
    Padding,
}

/// A child in the decoding tree: an inner node or a symbol.
#[derive(Debug, Clone, Copy)]
enum Child {
    Empty,
    Node(u16),
    Symbol(u16),
}

/// The decoding tree: node 0 is the root, each node has a child per bit.
fn tree() -> &'static [[Child; 2]] {
    static TREE: OnceLock<Vec<[Child; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut nodes = vec![[Child::Empty; 2]];
        for (symbol, &(code, len)) in (0u16..).zip(CODES.iter()) {
            let mut at = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[at][bit] = Child::Symbol(symbol);
                    break;
                }
                at = match nodes[at][bit] {
                    Child::Node(n) => usize::from(n),
                    Child::Empty | Child::Symbol(_) => {
                        nodes.push([Child::Empty; 2]);
                        let n = nodes.len() - 1;
                        // 256 leaves need 255 inner nodes: the index fits.
                        nodes[at][bit] = Child::Node(n as u16);
                        n
                    }
                };
            }
        }
        nodes
    })
}

/// Appends the decoding of a Huffman-coded string to `out`.
pub(crate) fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let nodes = tree();
    let mut at = 0usize;
    // Bits read since the last symbol, and whether they were all ones.
    let mut pending = 0u32;
    let mut all_ones = true;
    for byte in input {
        for i in (0..8).rev() {
            let bit = usize::from((byte >> i) & 1);
            match nodes.get(at).map(|n| n[bit]) {
                Some(Child::Node(n)) => {
                    at = usize::from(n);
                    pending += 1;
                    all_ones &= bit == 1;
                }
                Some(Child::Symbol(EOS)) => return Err(HuffmanError::Eos),
                Some(Child::Symbol(s)) => {
                    // Symbols other than EOS are below 256.
                    out.push(s as u8);
                    at = 0;
                    pending = 0;
                    all_ones = true;
                }
                // The code is complete, so this cannot happen; refuse anyway.
                Some(Child::Empty) | None => return Err(HuffmanError::Padding),
            }
        }
    }
    if pending > 7 || !all_ones {
        return Err(HuffmanError::Padding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use proptest::prelude::*;

    use super::*;

    /// Encodes with the same table (padding with ones), for round trips.
    fn encode(input: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        let (mut acc, mut bits) = (0u64, 0u32);
        for &b in input {
            let (code, len) = CODES[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    fn decoded(input: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = vec![];
        decode(input, &mut out).map(|()| out)
    }

    #[test]
    fn rfc7541_examples() {
        // Appendix C.4.1 to C.4.3.
        let cases: [(&[u8], &[u8]); 4] = [
            (
                &[
                    0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
                ],
                b"www.example.com",
            ),
            (&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], b"no-cache"),
            (
                &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f],
                b"custom-key",
            ),
            (
                &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf],
                b"custom-value",
            ),
        ];
        for (coded, plain) in cases {
            assert_eq!(decoded(coded).unwrap(), plain);
            assert_eq!(encode(plain), coded);
        }
    }

    #[test]
    fn eos_and_bad_padding_are_refused() {
        // 30 ones: EOS.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
        // '0' (00000) then three zero bits of padding.
        assert_eq!(decoded(&[0x00]), Err(HuffmanError::Padding));
        // A whole byte of padding after 'a' (00011): 8 + 3 = 11 ones > 7 bits.
        assert_eq!(decoded(&[0x1f, 0xff]), Err(HuffmanError::Padding));
        assert_eq!(decoded(&[]), Ok(vec![]));
    }

    proptest! {
        #[test]
        fn round_trips_and_agrees_with_another_decoder(
            input in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let coded = encode(&input);
            prop_assert_eq!(decoded(&coded).unwrap(), input.clone());
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&coded).unwrap();
            prop_assert_eq!(theirs, input);
        }

        #[test]
        fn random_input_agrees_with_another_decoder(
            input in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let ours = decoded(&input).ok();
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&input).ok();
            prop_assert_eq!(ours, theirs);
        }
    }
}
