//! A minimal DER reader and writer: just enough to split concatenated
//! certificates, to take a CSR apart into its signed bytes, key, algorithm
//! and signature, to read an RSA public key's modulus and exponent, to
//! encode and decode the SVID attributes extension, and to write leaf
//! certificates (`leaf.rs`).
//!
//! Full parsing of certificates stays with x509-parser; this only finds
//! element boundaries, which the higher-level parsers do not expose as raw
//! bytes.

use crate::SvidError;

/// DER tag of a SEQUENCE.
pub(crate) const TAG_SEQUENCE: u8 = 0x30;
/// DER tag of a BIT STRING.
pub(crate) const TAG_BIT_STRING: u8 = 0x03;
/// DER tag of an INTEGER.
pub(crate) const TAG_INTEGER: u8 = 0x02;
/// DER tag of a UTF8String.
pub(crate) const TAG_UTF8_STRING: u8 = 0x0c;
/// DER tag of an OCTET STRING.
pub(crate) const TAG_OCTET_STRING: u8 = 0x04;
/// DER tag of an OBJECT IDENTIFIER.
pub(crate) const TAG_OID: u8 = 0x06;
/// DER tag of a SET (OF).
pub(crate) const TAG_SET: u8 = 0x31;
/// DER tag of `[0]`, constructed (a CSR's attributes).
pub(crate) const TAG_CONTEXT_0: u8 = 0xa0;

/// One element: its tag, its whole encoding (header included) and its contents.
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u8,
    pub(crate) whole: &'a [u8],
    pub(crate) contents: &'a [u8],
}

/// Reads the element at the start of `input`; returns it and the rest.
pub(crate) fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), SvidError> {
    let truncated = || SvidError::Der("truncated element".to_owned());
    let (&tag, rest) = input.split_first().ok_or_else(truncated)?;
    if tag & 0x1f == 0x1f {
        return Err(SvidError::Der(
            "multi-byte tags are not used here".to_owned(),
        ));
    }
    let (&first, rest) = rest.split_first().ok_or_else(truncated)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        // Four length octets already allow 4 GiB, far beyond any certificate.
        if n == 0 || n > 4 {
            return Err(SvidError::Der("unsupported length encoding".to_owned()));
        }
        let (octets, rest) = rest.split_at_checked(n).ok_or_else(truncated)?;
        if octets[0] == 0 {
            return Err(SvidError::Der("non-minimal length".to_owned()));
        }
        let len = octets
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        if len < 0x80 {
            return Err(SvidError::Der("non-minimal length".to_owned()));
        }
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len).ok_or_else(truncated)?;
    let header_len = input.len() - rest.len() - len;
    let whole = &input[..header_len + len];
    Ok((
        Tlv {
            tag,
            whole,
            contents,
        },
        rest,
    ))
}

/// Reads an element that must carry `tag`.
pub(crate) fn expect<'a>(
    input: &'a [u8],
    tag: u8,
    what: &str,
) -> Result<(Tlv<'a>, &'a [u8]), SvidError> {
    let (tlv, rest) = read_tlv(input)?;
    if tlv.tag != tag {
        return Err(SvidError::Der(format!(
            "expected {what} (tag {tag:#04x}), found tag {:#04x}",
            tlv.tag
        )));
    }
    Ok((tlv, rest))
}

/// Reads the element that must be all of `input`, carrying `tag`.
pub(crate) fn expect_all<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<Tlv<'a>, SvidError> {
    let (tlv, rest) = expect(input, tag, what)?;
    if !rest.is_empty() {
        return Err(SvidError::Der(format!(
            "{} trailing bytes after the {what}",
            rest.len()
        )));
    }
    Ok(tlv)
}

/// Reads `AlgorithmIdentifier, BIT STRING` making up all of `input` (the
/// contents of a SubjectPublicKeyInfo, or the tail of a signed structure):
/// the algorithm and the BIT STRING's bytes, which must have no unused bits.
pub(crate) fn algorithm_and_bits<'a>(
    input: &'a [u8],
    what: &str,
) -> Result<(Tlv<'a>, &'a [u8]), SvidError> {
    let (alg, rest) = expect(input, TAG_SEQUENCE, "AlgorithmIdentifier")?;
    let bits = expect_all(rest, TAG_BIT_STRING, what)?;
    match bits.contents.split_first() {
        Some((0, bytes)) => Ok((alg, bytes)),
        _ => Err(SvidError::Der(format!(
            "the {what} BIT STRING has unused bits"
        ))),
    }
}

/// Appends one element with the minimal (DER) length encoding.
pub(crate) fn write_tlv(tag: u8, contents: &[u8], out: &mut Vec<u8>) {
    write_header(tag, contents.len(), out);
    out.extend_from_slice(contents);
}

/// Appends the tag and minimal (DER) length of an element of `len` content
/// bytes; the contents are for the caller to append.
pub(crate) fn write_header(tag: u8, len: usize, out: &mut Vec<u8>) {
    out.push(tag);
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            let significant = &bytes[skip..];
            // At most size_of::<usize>() octets, so the count fits in 7 bits.
            let count = u8::try_from(significant.len()).unwrap_or(0x7f);
            out.push(0x80 | count);
            out.extend_from_slice(significant);
        }
    }
}

/// The size of a whole element of `len` content bytes: header and contents.
pub(crate) fn tlv_len(len: usize) -> usize {
    let length_octets = if len < 0x80 {
        1
    } else {
        1 + (usize::BITS - len.leading_zeros()).div_ceil(8) as usize
    };
    1 + length_octets + len
}

/// Appends an OBJECT IDENTIFIER of `arcs` (at least two, the first two
/// forming one subidentifier as X.690 §8.19.4 says).
pub(crate) fn write_oid(arcs: &[u64], out: &mut Vec<u8>) {
    let mut contents = Vec::with_capacity(arcs.len() * 3);
    let first = match arcs {
        [a, b, ..] => a * 40 + b,
        [a] => a * 40,
        [] => 0,
    };
    for arc in std::iter::once(first).chain(arcs.iter().skip(2).copied()) {
        let groups = (u64::BITS - arc.leading_zeros()).div_ceil(7).max(1);
        for i in (0..groups).rev() {
            // Seven bits a byte, most significant first; the top bit marks "more follow".
            let byte = u8::try_from((arc >> (7 * i)) & 0x7f).unwrap_or(0);
            contents.push(if i == 0 { byte } else { byte | 0x80 });
        }
    }
    write_tlv(TAG_OID, &contents, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_lengths() {
        let (tlv, rest) = read_tlv(&[0x30, 0x01, 0xaa, 0xbb]).unwrap();
        assert_eq!(
            (tlv.tag, tlv.contents, tlv.whole.len()),
            (0x30, &[0xaa][..], 3)
        );
        assert_eq!(rest, &[0xbb]);

        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(0u8, 0x80));
        let (tlv, rest) = read_tlv(&long).unwrap();
        assert_eq!(tlv.contents.len(), 0x80);
        assert!(rest.is_empty());
    }

    #[test]
    fn write_uses_minimal_lengths_and_reads_back() {
        for len in [0usize, 1, 0x7f, 0x80, 0xff, 0x100, 0x1_0000] {
            let contents = vec![0x5a; len];
            let mut out = Vec::new();
            write_tlv(TAG_SEQUENCE, &contents, &mut out);
            let header = match len {
                0..=0x7f => 2,
                0x80..=0xff => 3,
                0x100..=0xffff => 4,
                _ => 5,
            };
            assert_eq!(out.len(), header + len, "len {len}");
            let (tlv, rest) = read_tlv(&out).unwrap();
            assert_eq!((tlv.tag, tlv.contents), (TAG_SEQUENCE, contents.as_slice()));
            assert!(rest.is_empty());
        }
        let mut out = Vec::new();
        write_tlv(TAG_UTF8_STRING, b"ab", &mut out);
        assert_eq!(out, [0x0c, 0x02, b'a', b'b']);
    }

    #[test]
    fn oids_and_lengths_encode_as_x690_says() {
        let mut out = Vec::new();
        // 1.2.840.10045.4.3.2, ecdsa-with-SHA256.
        write_oid(&[1, 2, 840, 10045, 4, 3, 2], &mut out);
        assert_eq!(
            out,
            [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        );
        out.clear();
        write_oid(&[2, 5, 29, 17, 0, 128], &mut out);
        assert_eq!(out, [0x06, 0x06, 0x55, 0x1d, 0x11, 0x00, 0x81, 0x00]);
        for len in [0usize, 0x7f, 0x80, 0x1_0000] {
            let mut whole = Vec::new();
            write_tlv(TAG_SEQUENCE, &vec![0; len], &mut whole);
            assert_eq!(tlv_len(len), whole.len(), "len {len}");
        }
    }

    #[test]
    fn rejects_truncation_and_non_minimal_lengths() {
        assert!(read_tlv(&[]).is_err());
        assert!(read_tlv(&[0x30]).is_err());
        assert!(read_tlv(&[0x30, 0x02, 0x00]).is_err());
        assert!(read_tlv(&[0x30, 0x81, 0x05, 0, 0, 0, 0, 0]).is_err());
        assert!(read_tlv(&[0x30, 0x80]).is_err());
        assert!(expect(&[0x02, 0x01, 0x00], TAG_SEQUENCE, "SEQUENCE").is_err());
    }
}
