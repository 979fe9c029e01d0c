//! The client-to-server byte stream of an HTTP/2 connection, frame by frame
//! (RFC 9113 §4), with the header blocks whose `:authority` h2 would refuse
//! rewritten.

use std::borrow::Cow;

use crate::{REPLACEMENT_AUTHORITY, authority_is_valid};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;
/// HEADERS frame type.
const HEADERS: u8 = 0x1;
/// CONTINUATION frame type.
const CONTINUATION: u8 = 0x9;
/// Flags of HEADERS and CONTINUATION (RFC 9113 §6.2, §6.10).
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Length of the PRIORITY fields of a HEADERS frame (dependency + weight).
const PRIORITY_LEN: usize = 5;
/// Largest frame payload the shim emits: the initial
/// `SETTINGS_MAX_FRAME_SIZE`, which no peer may advertise below, so every
/// server accepts it whatever it advertised.
const MAX_FRAME: usize = 16_384;
/// The HPACK dynamic table size h2 advertises (`SETTINGS_HEADER_TABLE_SIZE`,
/// unchanged by tonic): a client may not grow its table beyond it.
const HEADER_TABLE_SIZE: usize = 4096;
/// Default bound on a header block's decoded list: what tonic (hyper)
/// itself accepts; gRPC header blocks are a few hundred bytes. The block's
/// frames may take twice that (frame headers, padding).
pub const DEFAULT_MAX_HEADER_LIST_SIZE: usize = 16 * 1024;
/// What a field adds to a header list beyond its name and value
/// (RFC 9113 §6.5.2), so a list of `n` bytes has at most `n / 32` fields.
const FIELD_OVERHEAD: usize = 32;

/// Why a connection is closed by the shim: each is a client that broke
/// HTTP/2 or HPACK, or exceeded the header bound; h2 would have ended such a
/// connection too (or, for the bound, refused the request).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShimError {
    /// A header block (its frames, or its decoded header list as counted by
    /// RFC 9113 §6.5.2) exceeds the configured bound.
    #[error("header block larger than {limit} bytes")]
    HeaderBlockTooLarge {
        /// The configured bound.
        limit: usize,
    },
    /// A header block has more fields than a list of the configured size
    /// can hold; found by counting, before any string is decoded, so that a
    /// block of many tiny Huffman-coded strings costs no decoding work.
    #[error("header block with more than {limit} fields")]
    TooManyFields {
        /// The most fields accepted.
        limit: usize,
    },
    /// The frames break an HTTP/2 rule the shim depends on: a CONTINUATION
    /// without an open header block, another frame inside a header block,
    /// or padding/priority fields longer than the frame.
    #[error("HTTP/2 protocol error: {0}")]
    Protocol(&'static str),
    /// The header block is not valid HPACK (RFC 7541), so the dynamic table
    /// could no longer be tracked.
    #[error("HPACK decoding error: {0}")]
    Hpack(String),
}

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the 24-byte client preface has been seen.
    Preface,
    /// Frames.
    Frames,
    /// The client did not send the HTTP/2 preface: nothing is interpreted,
    /// and the server reports the error itself.
    Opaque,
}

/// A header block being collected: the HEADERS frame and its CONTINUATIONs.
#[derive(Debug)]
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    /// The concatenated field block fragments.
    fragment: Vec<u8>,
    /// The frames as received, sent on unchanged when nothing is rewritten.
    raw: Vec<u8>,
}

/// Rewrites the client-to-server bytes of one HTTP/2 connection.
///
/// Every header block is HPACK-decoded, which keeps this side's copy of the
/// client's dynamic table exact. Blocks pass through byte for byte until one
/// carries an `:authority` h2 would refuse; that block and every later one on
/// the connection are re-encoded (the refused value replaced with
/// [`REPLACEMENT_AUTHORITY`]) as literals that are never indexed. The server's
/// HPACK table then gains no entry the client does not know of, and the
/// client's later references to its own table are resolved here, never by
/// the server. "Never indexed" also keeps whatever protection the client
/// asked for on a field (RFC 7541 §6.2.3), since the original representation
/// is not known after decoding.
pub struct Rewriter {
    phase: Phase,
    /// Input not yet consumed (a partial frame header or header frame).
    pending: Vec<u8>,
    /// Payload bytes of a passed-through frame still to come.
    pass_remaining: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    rewriting: bool,
    max_header_list_size: usize,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("phase", &self.phase)
            .field("pending", &self.pending.len())
            .field("rewriting", &self.rewriting)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_HEADER_LIST_SIZE)
    }
}

impl Rewriter {
    /// A rewriter for a new connection; a header block whose frames or
    /// decoded list exceed `max_header_list_size` bytes ends it.
    pub fn new(max_header_list_size: usize) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            phase: Phase::Preface,
            pending: Vec::new(),
            pass_remaining: 0,
            block: None,
            decoder,
            rewriting: false,
            max_header_list_size,
        }
    }

    /// Whether a header block has been re-encoded on this connection.
    pub fn is_rewriting(&self) -> bool {
        self.rewriting
    }

    /// Feeds bytes read from the client; appends to `out` what the server
    /// is to read. Bytes of an incomplete HEADERS or CONTINUATION frame are
    /// held until the frame is complete.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShimError> {
        // Payloads of other frames are streamed through without buffering.
        let mut input = input;
        if self.pending.is_empty() {
            input = self.pass_through(input, out);
        }
        self.pending.extend_from_slice(input);
        let mut pos = 0;
        let result = self.drain(&mut pos, out);
        self.pending.drain(..pos);
        result
    }

    /// Copies the rest of a passed-through frame's payload; returns the
    /// input after it.
    fn pass_through<'a>(&mut self, input: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        if self.phase == Phase::Opaque {
            out.extend_from_slice(input);
            return &[];
        }
        let n = self.pass_remaining.min(input.len());
        let (now, rest) = input.split_at(n);
        out.extend_from_slice(now);
        self.pass_remaining -= n;
        rest
    }

    /// Consumes as much of `pending` as forms complete units, advancing `pos`.
    fn drain(&mut self, pos: &mut usize, out: &mut Vec<u8>) -> Result<(), ShimError> {
        loop {
            let Some(avail) = self.pending.get(*pos..).filter(|a| !a.is_empty()) else {
                return Ok(());
            };
            match self.phase {
                Phase::Opaque => {
                    out.extend_from_slice(avail);
                    *pos = self.pending.len();
                }
                Phase::Preface => {
                    let n = avail.len().min(PREFACE.len());
                    if avail.get(..n) != PREFACE.get(..n) {
                        self.phase = Phase::Opaque;
                    } else if n < PREFACE.len() {
                        return Ok(());
                    } else {
                        out.extend_from_slice(PREFACE);
                        *pos += PREFACE.len();
                        self.phase = Phase::Frames;
                    }
                }
                Phase::Frames if self.pass_remaining > 0 => {
                    let n = self.pass_remaining.min(avail.len());
                    out.extend_from_slice(avail.get(..n).unwrap_or_default());
                    *pos += n;
                    self.pass_remaining -= n;
                }
                Phase::Frames => {
                    let Some(head) = avail.get(..FRAME_HEADER) else {
                        return Ok(());
                    };
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let kind = head[3];
                    let stream_id =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let header_frame = match (&self.block, kind) {
                        (None, HEADERS) => true,
                        (Some(b), CONTINUATION) if b.stream_id == stream_id => true,
                        (None, CONTINUATION) => {
                            return Err(ShimError::Protocol("CONTINUATION without a header block"));
                        }
                        (Some(_), _) => {
                            return Err(ShimError::Protocol("another frame inside a header block"));
                        }
                        (None, _) => false,
                    };
                    if !header_frame {
                        out.extend_from_slice(head);
                        *pos += FRAME_HEADER;
                        self.pass_remaining = len;
                        continue;
                    }
                    let held = self.block.as_ref().map_or(0, |b| b.raw.len());
                    if held + FRAME_HEADER + len > 2 * self.max_header_list_size {
                        return Err(ShimError::HeaderBlockTooLarge {
                            limit: 2 * self.max_header_list_size,
                        });
                    }
                    let Some(frame) = avail.get(..FRAME_HEADER + len) else {
                        return Ok(());
                    };
                    let frame = frame.to_vec();
                    *pos += frame.len();
                    self.header_frame(&frame, out)?;
                }
            }
        }
    }

    /// Adds a complete HEADERS or CONTINUATION frame to the open block, and
    /// finishes the block at END_HEADERS.
    fn header_frame(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), ShimError> {
        let (head, payload) = frame.split_at(FRAME_HEADER);
        let flags = head[4];
        if let Some(block) = self.block.as_mut() {
            // CONTINUATION has no padding or priority (RFC 9113 §6.10).
            block.fragment.extend_from_slice(payload);
        } else {
            self.block = Some(open_block(head, payload)?);
        }
        if let Some(block) = self.block.as_mut() {
            block.raw.extend_from_slice(frame);
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        match self.block.take() {
            Some(block) => self.finish(block, out),
            None => Ok(()),
        }
    }

    /// Decodes a complete header block and sends it on, as received or
    /// re-encoded.
    fn finish(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let limit = self.max_header_list_size;
        let max_fields = limit / FIELD_OVERHEAD;
        if count_fields(&block.fragment)? > max_fields {
            return Err(ShimError::TooManyFields { limit: max_fields });
        }
        let plain = plain_strings(&block.fragment)?;
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&plain, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                size = size.saturating_add(name.len() + value.len() + FIELD_OVERHEAD);
                if size <= limit {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| ShimError::Hpack(e.to_string()))?;
        if size > limit {
            return Err(ShimError::HeaderBlockTooLarge { limit });
        }
        let refused = |(name, value): &(Vec<u8>, Vec<u8>)| {
            name.as_slice() == b":authority" && !authority_is_valid(value)
        };
        if !self.rewriting && !fields.iter().any(refused) {
            out.extend_from_slice(&block.raw);
            return Ok(());
        }
        if !self.rewriting {
            tracing::debug!(
                stream = block.stream_id,
                "client sent an :authority h2 refuses; rewriting this connection's header blocks"
            );
            self.rewriting = true;
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for field in &fields {
            let value = if refused(field) {
                REPLACEMENT_AUTHORITY.as_bytes()
            } else {
                field.1.as_slice()
            };
            encode_never_indexed(&field.0, value, &mut encoded);
        }
        write_header_frames(&block, &encoded, out);
        Ok(())
    }
}

/// Starts a header block from a HEADERS frame: strips its padding and
/// keeps its priority fields.
fn open_block(head: &[u8], payload: &[u8]) -> Result<Block, ShimError> {
    let flags = head[4];
    let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut body = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = body
            .split_first()
            .ok_or(ShimError::Protocol("PADDED HEADERS without a pad length"))?;
        let keep = rest
            .len()
            .checked_sub(usize::from(pad))
            .ok_or(ShimError::Protocol("padding longer than the HEADERS frame"))?;
        body = rest.get(..keep).unwrap_or_default();
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, rest) = body
            .split_first_chunk::<PRIORITY_LEN>()
            .ok_or(ShimError::Protocol("HEADERS too short for its priority"))?;
        priority = Some(*fields);
        body = rest;
    }
    Ok(Block {
        stream_id,
        end_stream: flags & END_STREAM != 0,
        priority,
        fragment: body.to_vec(),
        raw: Vec::new(),
    })
}

/// Counts the fields of a header block by its structure alone (RFC 7541
/// §6), decoding no string.
fn count_fields(block: &[u8]) -> Result<usize, ShimError> {
    let mut pos = 0;
    let mut fields = 0;
    while let Some(&first) = block.get(pos) {
        if first & 0x80 != 0 {
            // Indexed field (§6.1).
            pos = read_integer(block, pos, 7)?.1;
            fields += 1;
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update (§6.3).
            pos = read_integer(block, pos, 5)?.1;
        } else {
            // Literal (§6.2): an index or a name string, then a value string.
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (index, after) = read_integer(block, pos, prefix)?;
            pos = after;
            if index == 0 {
                pos = skip_string(block, pos)?;
            }
            pos = skip_string(block, pos)?;
            fields += 1;
        }
    }
    Ok(fields)
}

/// The header block with every Huffman-coded string replaced by its plain
/// form (same fields, same table updates), decoded by [`crate::huffman`].
fn plain_strings(block: &[u8]) -> Result<Vec<u8>, ShimError> {
    let mut out = Vec::with_capacity(block.len() * 2);
    let mut pos = 0;
    let copy_integer = |out: &mut Vec<u8>, pos: usize, prefix| {
        let (_, after) = read_integer(block, pos, prefix)?;
        out.extend_from_slice(block.get(pos..after).unwrap_or_default());
        Ok::<usize, ShimError>(after)
    };
    while let Some(&first) = block.get(pos) {
        if first & 0x80 != 0 {
            pos = copy_integer(&mut out, pos, 7)?;
        } else if first & 0xe0 == 0x20 {
            pos = copy_integer(&mut out, pos, 5)?;
        } else {
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (index, _) = read_integer(block, pos, prefix)?;
            pos = copy_integer(&mut out, pos, prefix)?;
            if index == 0 {
                pos = plain_string(block, pos, &mut out)?;
            }
            pos = plain_string(block, pos, &mut out)?;
        }
    }
    Ok(out)
}

/// Appends the string literal at `pos` with its Huffman coding undone;
/// returns the position after it.
fn plain_string(block: &[u8], pos: usize, out: &mut Vec<u8>) -> Result<usize, ShimError> {
    let end = skip_string(block, pos)?;
    let huffman = block.get(pos).is_some_and(|b| b & 0x80 != 0);
    let (_, start) = read_integer(block, pos, 7)?;
    let raw = block.get(start..end).unwrap_or_default();
    if huffman {
        let mut text = Vec::with_capacity(raw.len() * 2);
        crate::huffman::decode(raw, &mut text).map_err(|e| ShimError::Hpack(e.to_string()))?;
        encode_integer(text.len(), 7, 0x00, out);
        out.extend_from_slice(&text);
    } else {
        out.extend_from_slice(block.get(pos..end).unwrap_or_default());
    }
    Ok(end)
}

/// An HPACK integer at `pos` (RFC 7541 §5.1): its value and the position
/// after it. More than 4 continuation bytes (2^28) is refused, as HPACK
/// decoders do.
fn read_integer(block: &[u8], pos: usize, prefix: u8) -> Result<(usize, usize), ShimError> {
    let truncated = || ShimError::Hpack("truncated integer".to_owned());
    let max = (1usize << prefix) - 1;
    let first = usize::from(*block.get(pos).ok_or_else(truncated)?) & max;
    if first < max {
        return Ok((first, pos + 1));
    }
    let mut value = first;
    for i in 0..4 {
        let byte = *block.get(pos + 1 + i).ok_or_else(truncated)?;
        value += usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, pos + 2 + i));
        }
    }
    Err(ShimError::Hpack("integer too long".to_owned()))
}

/// The position after the string literal at `pos` (RFC 7541 §5.2).
fn skip_string(block: &[u8], pos: usize) -> Result<usize, ShimError> {
    let (len, start) = read_integer(block, pos, 7)?;
    start
        .checked_add(len)
        .filter(|end| *end <= block.len())
        .ok_or_else(|| ShimError::Hpack("truncated string".to_owned()))
}

/// Appends one field as "literal never indexed, new name", strings not
/// Huffman-coded (RFC 7541 §6.2.3).
pub(crate) fn encode_never_indexed(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    encode_integer(0, 4, 0x10, out);
    for s in [name, value] {
        encode_integer(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// An HPACK integer with an `prefix`-bit prefix after the `flags` bits
/// (RFC 7541 §5.1).
fn encode_integer(mut value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Writes `encoded` as the block's HEADERS frame and as many CONTINUATION
/// frames as [`MAX_FRAME`] requires; padding is dropped, priority kept.
fn write_header_frames(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let first_room = MAX_FRAME - block.priority.map_or(0, |p| p.len());
    let (first, mut rest) = encoded.split_at(first_room.min(encoded.len()));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    write_frame(HEADERS, flags, block.stream_id, &[priority, first], out);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(MAX_FRAME.min(rest.len()));
        let flags = if after.is_empty() { END_HEADERS } else { 0 };
        write_frame(CONTINUATION, flags, block.stream_id, &[chunk], out);
        rest = after;
    }
}

/// Appends a frame header and its payload parts.
fn write_frame(kind: u8, flags: u8, stream_id: u32, parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // len <= MAX_FRAME, so it fits the 24-bit length field.
    let len = len.to_be_bytes();
    out.extend_from_slice(&len[len.len() - 3..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests;
