//! Paged sync: one update for an agent (a snapshot, or the changes of one or
//! more revisions) is sent as pages of at most [`PAGE_BYTES`] encoded bytes,
//! so that no authorized set, however large, makes a message the agent
//! cannot decode (the protocol is in `SyncMessage.continued`,
//! crates/sigil-proto/proto/server.proto; docs/design-notes.md, "Paged
//! sync").
//!
//! Each page is written straight into its gRPC message: the index's entries
//! are encoded from [`sigil_types::Entry`] by
//! [`entry_wire`](sigil_proto::convert::entry_wire), never built as
//! [`pb::Entry`] values, and each entry is sized once (docs/benchmarks.md,
//! "First sync of 100,000 entries").

use std::sync::Arc;

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use sigil_proto::convert::entry_wire;
use sigil_proto::server::v1 as pb;

/// The most encoded bytes of one sync page (4 MiB). Far below what the
/// agent decodes (`sigil_agent::client::MAX_MESSAGE_BYTES`), so that the
/// first page's bundles fit beside its entries, and small enough that the
/// server holds a few pages per stream in its send queue, not a whole set.
pub const PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The bytes before a gRPC message: the compression flag (0) and the
/// message's length (big-endian `u32`).
pub const FRAME_PREFIX: usize = 5;

/// The `SyncMessage` fields a page spreads an update's lists over.
const UPSERTED: u32 = 3;
const DELETED_IDS: u32 = 4;

/// An upserted entry as a page writes it: the size of its `Entry` message
/// body and that body.
pub trait WireEntry {
    /// The encoded size of the message body (no field key, no length).
    fn body_len(&self) -> usize;
    /// Appends the message body, `body_len` bytes.
    fn encode_body(&self, buf: &mut Vec<u8>);
}

/// An entry already in wire form, encoded by prost.
impl WireEntry for pb::Entry {
    fn body_len(&self) -> usize {
        self.encoded_len()
    }

    fn encode_body(&self, buf: &mut Vec<u8>) {
        self.encode_raw(buf);
    }
}

/// An entry of the index, encoded straight from it: the bytes of its
/// `pb::Entry`, without building one.
impl WireEntry for Arc<sigil_types::Entry> {
    fn body_len(&self) -> usize {
        entry_wire::encoded_len(self)
    }

    fn encode_body(&self, buf: &mut Vec<u8>) {
        entry_wire::encode(self, buf);
    }
}

/// Sorts entries by ID, the order an update's entries are paged in (so
/// that one set always pages the same way).
///
/// Each ID's first 16 bytes, read as one big-endian number (zero-padded),
/// order the IDs as the strings do; only IDs with equal prefixes compare
/// whole. Sorting (prefix, entry) pairs reads each entry once, where a
/// comparison of two `Arc<Entry>` by ID follows two pointers per side: for
/// 100,000 entries that sort was dominated by cache misses
/// (docs/benchmarks.md, "First sync of 100,000 entries").
pub fn sort_by_id(entries: &mut Vec<Arc<sigil_types::Entry>>) {
    fn prefix(id: &str) -> u128 {
        let mut b = [0u8; 16];
        let n = id.len().min(16);
        b[..n].copy_from_slice(&id.as_bytes()[..n]);
        u128::from_be_bytes(b)
    }
    let mut keyed: Vec<(u128, Arc<sigil_types::Entry>)> = entries
        .drain(..)
        .map(|e| (prefix(e.id.as_str()), e))
        .collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    entries.extend(keyed.into_iter().map(|(_, e)| e));
}

/// A page whose message does not fit the `u32` length of a gRPC message
/// (only bundles of gigabytes could make one).
#[derive(Debug, thiserror::Error)]
#[error("a sync page of {0} bytes does not fit a gRPC message")]
pub struct PageTooLarge(pub usize);

/// The pages of one update, each a gRPC message ([`FRAME_PREFIX`], then the
/// `SyncMessage`), made one at a time as they are asked for: the server
/// encodes an entry only when its page is due, so that the agent decodes
/// one page while the server builds the next, and no more than a page of
/// encoded entries exists at once, whatever the set's size.
///
/// The first page carries the update's `snapshot` flag, bundle, federated
/// bundles and tainted authorities; every page carries its revision; every
/// page but the last has `continued` set. The upserted entries, then the
/// deleted IDs, are spread over the pages in order, so that concatenating
/// the pages' lists gives the update's. An update without entries is one
/// page. Only one thing can exceed the bound: a page holding a single entry
/// that alone is larger (entry validation keeps every entry far below
/// [`PAGE_BYTES`]; see the test `the_largest_valid_entry_fits_a_page_many_times`)
/// or a first page whose bundles alone are larger (the bundles then travel
/// alone on it).
///
/// A page's bytes are prost's encoding of the same `SyncMessage`: prost
/// writes fields by tag, so a page is written as the header's fields 1 and 2
/// (revision, snapshot), the entries (3), the deleted IDs (4), then the
/// header's fields 5 to 11 (bundles, tainted authorities, `continued`).
pub struct Pages<I: Iterator> {
    /// The first page's header, until that page is made.
    header: Option<pb::SyncMessage>,
    revision: u64,
    upserted: I,
    deleted: std::vec::IntoIter<String>,
    /// The item that did not fit the previous page: the next one's first.
    carry: Option<Item<I::Item>>,
    bound: usize,
    /// Encoded size of the `continued` flag.
    flag: usize,
    /// Encoded size of a later page without items (flag included).
    empty: usize,
    done: bool,
}

/// One thing a page holds besides its header.
enum Item<E> {
    /// An entry and the size of its message body, computed once.
    Upserted(E, usize),
    Deleted(String),
}

impl<E: WireEntry> Item<E> {
    /// Its encoded size within a `SyncMessage` (protobuf fields add up).
    fn len(&self) -> usize {
        match self {
            Item::Upserted(_, body) => key_len(UPSERTED) + encoded_len_varint(*body as u64) + body,
            Item::Deleted(id) => prost::encoding::string::encoded_len(DELETED_IDS, id),
        }
    }

    fn encode(self, buf: &mut Vec<u8>) {
        match self {
            Item::Upserted(e, body) => {
                encode_key(UPSERTED, WireType::LengthDelimited, buf);
                encode_varint(body as u64, buf);
                e.encode_body(buf);
            }
            Item::Deleted(id) => prost::encoding::string::encode(DELETED_IDS, &id, buf),
        }
    }
}

impl<I> Pages<I>
where
    I: Iterator,
    I::Item: WireEntry,
{
    /// The pages of an update: `header` (its `upserted` ignored; its
    /// `deleted_ids` and every other field taken) and `upserted`, in the
    /// order given, in pages of at most `bound` encoded bytes.
    pub fn new(
        mut header: pb::SyncMessage,
        upserted: impl IntoIterator<IntoIter = I>,
        bound: usize,
    ) -> Self {
        header.upserted.clear();
        header.continued = false;
        let deleted = std::mem::take(&mut header.deleted_ids).into_iter();
        let revision = header.revision;
        // Sizes are counted as if `continued` were set: a page is sized
        // before it is known to be the last, and the flag only shrinks it.
        let flag = pb::SyncMessage {
            continued: true,
            ..Default::default()
        }
        .encoded_len();
        let empty = Self::later_page(revision).encoded_len() + flag;
        Self {
            header: Some(header),
            revision,
            upserted: upserted.into_iter(),
            deleted,
            carry: None,
            bound,
            flag,
            empty,
            done: false,
        }
    }

    fn later_page(revision: u64) -> pb::SyncMessage {
        pb::SyncMessage {
            revision,
            ..Default::default()
        }
    }

    fn next_item(&mut self) -> Option<Item<I::Item>> {
        if let Some(i) = self.carry.take() {
            return Some(i);
        }
        if let Some(e) = self.upserted.next() {
            let body = e.body_len();
            return Some(Item::Upserted(e, body));
        }
        self.deleted.next().map(Item::Deleted)
    }
}

/// Makes room in `buf` for `n` more bytes: at least double the capacity, as
/// `Vec` grows, but not past `most` (what the page can reach), so that a
/// page near the bound is not given twice its size.
fn reserve(buf: &mut Vec<u8>, n: usize, most: usize) {
    let need = buf.len() + n;
    if need > buf.capacity() {
        let want = (buf.capacity() * 2).min(most).max(need);
        buf.reserve_exact(want - buf.len());
    }
}

impl<I> Iterator for Pages<I>
where
    I: Iterator,
    I::Item: WireEntry,
{
    type Item = Result<Vec<u8>, PageTooLarge>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        // The header's fields before the lists (1, 2) and after them (5 to 11).
        let (head, mut tail) = match self.header.take() {
            Some(mut h) => {
                let head = pb::SyncMessage {
                    revision: std::mem::take(&mut h.revision),
                    snapshot: std::mem::take(&mut h.snapshot),
                    ..Default::default()
                };
                (head, h)
            }
            None => (Self::later_page(self.revision), pb::SyncMessage::default()),
        };
        let mut len = head.encoded_len() + tail.encoded_len() + self.flag;
        let mut buf = Vec::with_capacity(FRAME_PREFIX + len);
        buf.extend_from_slice(&[0; FRAME_PREFIX]);
        head.encode_raw(&mut buf);
        loop {
            let Some(item) = self.next_item() else {
                self.done = true;
                break;
            };
            let n = item.len();
            if len + n > self.bound && len > self.empty {
                self.carry = Some(item);
                tail.continued = true;
                break;
            }
            len += n;
            reserve(&mut buf, n, FRAME_PREFIX + len.max(self.bound));
            item.encode(&mut buf);
        }
        reserve(&mut buf, tail.encoded_len(), 0);
        tail.encode_raw(&mut buf);
        let body = buf.len() - FRAME_PREFIX;
        let Ok(prefix) = u32::try_from(body) else {
            self.done = true;
            return Some(Err(PageTooLarge(body)));
        };
        buf[1..FRAME_PREFIX].copy_from_slice(&prefix.to_be_bytes());
        Some(Ok(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sigil_types::entry::{MAX_DNS_NAMES, MAX_FEDERATES_WITH, MAX_HINT_LEN, MAX_SELECTORS};
    use sigil_types::selector::MAX_SELECTOR_LEN;
    use sigil_types::spiffe_id::{MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN};
    use sigil_types::{Attribute, Entry, EntryId, Selectors, SpiffeId, TrustDomain};

    /// A name of exactly `len` bytes: labels of up to 63 characters, made
    /// distinct by `tag` at the start.
    fn dotted(tag: usize, len: usize) -> String {
        let mut s = format!("n{tag}");
        while s.len() < len {
            let room = len - s.len();
            if room == 1 {
                s.push('z');
            } else if s.len() % 64 == 63 {
                s.push('.');
            } else {
                s.push('a');
            }
        }
        s
    }

    /// `spiffe://<td>/<path>` of exactly `len` bytes.
    fn long_id(td: &str, head: &str, len: usize) -> SpiffeId {
        let mut s = format!("spiffe://{td}/{head}");
        while s.len() < len {
            s.push(if s.len() % 100 == 0 { '/' } else { 'p' });
        }
        s.parse().unwrap()
    }

    /// The largest entry the admin API's validation accepts: every string
    /// and list at its cap, every number at its widest encoding.
    fn largest_valid_entry() -> (Entry, TrustDomain) {
        let td = TrustDomain::new(&dotted(0, MAX_TRUST_DOMAIN_LEN)).unwrap();
        let selectors: Vec<String> = (0..MAX_SELECTORS)
            .map(|i| {
                let head = format!("k8s:pod-label:{i:03}:");
                format!("{head}{}", "v".repeat(MAX_SELECTOR_LEN - head.len()))
            })
            .collect();
        let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
        let mut e = Entry::new(
            EntryId::try_from("e".repeat(255)).unwrap(),
            long_id(td.name(), "workload", MAX_ID_LEN),
            long_id(td.name(), "parent", MAX_ID_LEN),
            Selectors::parse_all(&selectors).unwrap(),
        );
        e.dns_names = (0..MAX_DNS_NAMES).map(|i| dotted(i, 253)).collect();
        e.federates_with = (1..=MAX_FEDERATES_WITH)
            .map(|i| TrustDomain::new(&dotted(i, MAX_TRUST_DOMAIN_LEN)).unwrap())
            .collect();
        e.attributes = Attribute::ALL.to_vec();
        e.hint = "h".repeat(MAX_HINT_LEN);
        e.x509_svid_ttl = sigil_types::entry::MAX_TTL_SECS;
        e.jwt_svid_ttl = sigil_types::entry::MAX_TTL_SECS;
        e.expires_at = Some(sigil_types::entry::MAX_EXPIRES_AT);
        e.revision = u64::MAX;
        e.created_at = i64::MIN;
        (e, td)
    }

    /// The pages of `update` (its entries encoded by prost), decoded, each
    /// checked to be one gRPC message whose bytes are prost's encoding of
    /// what it decodes to.
    fn pages(update: pb::SyncMessage, bound: usize) -> Vec<pb::SyncMessage> {
        let mut header = update;
        let upserted = std::mem::take(&mut header.upserted);
        Pages::new(header, upserted, bound)
            .map(|f| decode_frame(&f.unwrap()))
            .collect()
    }

    fn decode_frame(f: &[u8]) -> pb::SyncMessage {
        assert_eq!(f[0], 0, "not compressed");
        let len = u32::from_be_bytes(f[1..FRAME_PREFIX].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - FRAME_PREFIX);
        let m = pb::SyncMessage::decode(&f[FRAME_PREFIX..]).unwrap();
        if m.federated_bundles.len() <= 1 {
            // (A map of several is encoded in its iteration order.)
            assert_eq!(m.encode_to_vec(), &f[FRAME_PREFIX..]);
        }
        assert_eq!(m.encoded_len(), len);
        m
    }

    /// Entries of the index are paged and encoded exactly as their wire
    /// form would be.
    #[test]
    fn index_entries_page_as_their_wire_form() {
        let (big, _) = largest_valid_entry();
        let entries: Vec<Arc<Entry>> = (0..300)
            .map(|i| {
                let mut e = Entry::new(
                    EntryId::try_from(format!("e{i:04}")).unwrap(),
                    format!("spiffe://example.org/w/{i}").parse().unwrap(),
                    "spiffe://example.org/sigil/agent/join_token/a"
                        .parse()
                        .unwrap(),
                    Selectors::parse_all([format!("unix:uid:{i}")]).unwrap(),
                );
                e.revision = i;
                e.hint = "h".repeat(i as usize % 7);
                Arc::new(if i % 100 == 50 { big.clone() } else { e })
            })
            .collect();
        let wire: Vec<pb::Entry> = entries
            .iter()
            .map(|e| pb::Entry::from(e.as_ref()))
            .collect();
        let header = pb::SyncMessage {
            revision: 300,
            snapshot: true,
            bundle_json: "{}".into(),
            deleted_ids: vec!["gone".into()],
            tainted_changed: true,
            ..Default::default()
        };
        let direct: Vec<Vec<u8>> = Pages::new(header.clone(), entries, 64 * 1024)
            .map(Result::unwrap)
            .collect();
        let prost: Vec<Vec<u8>> = Pages::new(header, wire, 64 * 1024)
            .map(Result::unwrap)
            .collect();
        assert!(direct.len() > 2);
        assert_eq!(direct, prost);
    }

    #[test]
    fn the_largest_valid_entry_fits_a_page_many_times() {
        let (entry, td) = largest_valid_entry();
        entry.validate(&td).expect("the admin API accepts it");
        assert_eq!(entry.selectors.len(), MAX_SELECTORS);
        assert_eq!(entry.spiffe_id.to_string().len(), MAX_ID_LEN);
        assert!(
            entry
                .selectors
                .to_strings()
                .iter()
                .all(|s| s.len() == MAX_SELECTOR_LEN)
        );
        let wire = pb::Entry::from(&entry);
        let len = prost::encoding::message::encoded_len(3, &wire);
        // At least 8 of the largest entries per page: a cap raised so far
        // that this fails must raise PAGE_BYTES (and the agent's limits) too.
        assert!(len * 8 <= PAGE_BYTES, "largest entry is {len} bytes");
        // …and the entry really is near its caps (about 100 KiB today).
        assert!(len > 90 * 1024, "{len}");
        let pages = pages(
            pb::SyncMessage {
                revision: 1,
                upserted: vec![wire; 100],
                ..Default::default()
            },
            PAGE_BYTES,
        );
        assert!(pages.len() > 1);
        assert!(pages.iter().all(|p| p.encoded_len() <= PAGE_BYTES));
    }

    fn entry_of(id: usize, hint_len: usize) -> pb::Entry {
        pb::Entry {
            id: format!("e{id}"),
            spiffe_id: format!("spiffe://example.org/w{id}"),
            hint: "h".repeat(hint_len),
            ..Default::default()
        }
    }

    #[test]
    fn an_update_without_entries_is_one_page_as_it_was() {
        let m = pb::SyncMessage {
            revision: 7,
            snapshot: true,
            bundle_json: "{}".into(),
            federated_bundles_changed: true,
            ..Default::default()
        };
        assert_eq!(pages(m.clone(), PAGE_BYTES), vec![m]);
    }

    #[test]
    fn bundles_larger_than_a_page_travel_alone_on_the_first() {
        let m = pb::SyncMessage {
            revision: 3,
            bundle_json: "b".repeat(5000),
            upserted: (0..10).map(|i| entry_of(i, 100)).collect(),
            deleted_ids: vec!["gone".into()],
            ..Default::default()
        };
        let p = pages(m.clone(), 1000);
        assert!(p[0].upserted.is_empty() && p[0].deleted_ids.is_empty());
        assert_eq!(p[0].bundle_json, m.bundle_json);
        assert!(p[1..].iter().all(|p| p.encoded_len() <= 1000));
        let all: Vec<_> = p.iter().flat_map(|p| p.upserted.clone()).collect();
        assert_eq!(all, m.upserted);
        assert_eq!(p.last().unwrap().deleted_ids, m.deleted_ids);
    }

    fn update() -> impl Strategy<Value = (pb::SyncMessage, usize)> {
        (
            1000usize..6000,
            any::<u64>(),
            any::<bool>(),
            0usize..400,
            proptest::collection::vec(0usize..400, 0..60),
            proptest::collection::vec("[a-z0-9-]{1,40}", 0..60),
            any::<bool>(),
        )
            .prop_map(
                |(bound, revision, snapshot, bundle, hints, deleted, tainted)| {
                    let m = pb::SyncMessage {
                        revision,
                        snapshot,
                        bundle_json: "b".repeat(bundle),
                        upserted: hints
                            .iter()
                            .enumerate()
                            .map(|(i, h)| entry_of(i, *h))
                            .collect(),
                        deleted_ids: deleted,
                        federated_bundles: [("a.org".to_owned(), "{}".to_owned())].into(),
                        federated_bundles_changed: true,
                        tainted_x509_authorities: vec!["ab".into()],
                        tainted_changed: tainted,
                        ..Default::default()
                    };
                    (m, bound)
                },
            )
    }

    proptest! {
        /// The same order as sorting by the ID strings, IDs sharing long
        /// prefixes (or being prefixes of others) included.
        #[test]
        fn entries_sort_by_id_as_the_strings_do(
            ids in proptest::collection::vec(
                prop_oneof!["[a-c]{1,20}", "0123456789abcdef[a-c._-]{0,4}", "[0-9a-f-]{36}"],
                0..80,
            ),
        ) {
            let mut entries: Vec<Arc<Entry>> = ids
                .iter()
                .map(|id| {
                    Arc::new(Entry::new(
                        EntryId::try_from(id.clone()).unwrap(),
                        "spiffe://example.org/w".parse().unwrap(),
                        "spiffe://example.org/p".parse().unwrap(),
                        Selectors::new(),
                    ))
                })
                .collect();
            let mut want = entries.clone();
            want.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
            sort_by_id(&mut entries);
            let got: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let want: Vec<&str> = want.iter().map(|e| e.id.as_str()).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn pages_are_bounded_ordered_and_flagged((m, bound) in update()) {
            let p = pages(m.clone(), bound);
            for page in &p {
                prop_assert!(page.encoded_len() <= bound, "{} > {bound}", page.encoded_len());
                prop_assert_eq!(page.revision, m.revision);
            }
            // Nothing lost, nothing repeated, nothing reordered.
            let upserted: Vec<_> = p.iter().flat_map(|p| p.upserted.clone()).collect();
            let deleted: Vec<_> = p.iter().flat_map(|p| p.deleted_ids.clone()).collect();
            prop_assert_eq!(&upserted, &m.upserted);
            prop_assert_eq!(&deleted, &m.deleted_ids);
            // The header rides on the first page only.
            let mut header = p[0].clone();
            header.upserted = m.upserted.clone();
            header.deleted_ids = m.deleted_ids.clone();
            header.continued = false;
            prop_assert_eq!(&header, &m);
            for later in &p[1..] {
                let bare = pb::SyncMessage {
                    revision: m.revision,
                    upserted: later.upserted.clone(),
                    deleted_ids: later.deleted_ids.clone(),
                    continued: later.continued,
                    ..Default::default()
                };
                prop_assert_eq!(later, &bare);
                prop_assert!(!later.upserted.is_empty() || !later.deleted_ids.is_empty());
            }
            let (last, rest) = p.split_last().unwrap();
            prop_assert!(!last.continued);
            prop_assert!(rest.iter().all(|p| p.continued));
            // An update that fits (with room for the flag) stays whole.
            prop_assert!(p.len() == 1 || m.encoded_len() + 2 > bound);
        }
    }
}
