//! Paged sync: one update for an agent (a snapshot, or the changes of one or
//! more revisions) is sent as pages of at most [`PAGE_BYTES`] encoded bytes,
//! so that no authorized set, however large, makes a message the agent
//! cannot decode (the protocol is in `SyncMessage.continued`,
//! crates/sigil-proto/proto/server.proto; docs/design-notes.md, "Paged
//! sync").

use prost::Message;
use sigil_proto::server::v1 as pb;

/// The most encoded bytes of one sync page (4 MiB). Far below what the
/// agent decodes (`sigil_agent::client::MAX_MESSAGE_BYTES`), so that the
/// first page's bundles fit beside its entries, and small enough that the
/// server holds a few pages per stream in its send queue, not a whole set.
pub const PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Splits `update` into pages of at most `bound` encoded bytes each.
///
/// The first page carries the update's `snapshot` flag, bundle, federated
/// bundles and tainted authorities; every page carries its revision; every
/// page but the last has `continued` set. The upserted entries, then the
/// deleted IDs, are spread over the pages in order, so that concatenating
/// the pages' lists gives the update's. An update without entries is one
/// page. Only one thing can exceed `bound`: a page holding a single entry
/// that alone is larger (entry validation keeps every entry far below
/// [`PAGE_BYTES`]; see the test `the_largest_valid_entry_fits_a_page_many_times`)
/// or a first page whose bundles alone are larger (the bundles then travel
/// alone on it).
pub fn pages(update: pb::SyncMessage, bound: usize) -> Vec<pb::SyncMessage> {
    let mut header = update;
    let upserted = std::mem::take(&mut header.upserted);
    Pages::new(header, upserted, bound).collect()
}

/// The pages of one update, made one at a time as they are asked for (see
/// [`pages`], which collects them): the server converts and encodes an
/// entry only when its page is due, so that the agent decodes one page
/// while the server builds the next, and no more than a page of wire
/// entries exists at once, whatever the set's size.
pub struct Pages<I> {
    /// The first page's header, until that page is made.
    header: Option<pb::SyncMessage>,
    revision: u64,
    upserted: I,
    deleted: std::vec::IntoIter<String>,
    /// The item that did not fit the previous page: the next one's first.
    carry: Option<Item>,
    bound: usize,
    /// Encoded size of the `continued` flag.
    flag: usize,
    /// Encoded size of a later page without items (flag included).
    empty: usize,
    done: bool,
}

/// One thing a page holds besides its header. One is held at a time (the
/// carry), so its size does not matter; boxing would allocate per entry.
#[allow(clippy::large_enum_variant)]
enum Item {
    Upserted(pb::Entry),
    Deleted(String),
}

impl Item {
    /// Its encoded size within a `SyncMessage` (protobuf fields add up).
    fn len(&self) -> usize {
        match self {
            Item::Upserted(e) => prost::encoding::message::encoded_len(3, e),
            Item::Deleted(id) => prost::encoding::string::encoded_len(4, id),
        }
    }
}

impl<I: Iterator<Item = pb::Entry>> Pages<I> {
    /// The pages of an update: `header` (its `upserted` ignored; its
    /// `deleted_ids` and every other field taken) and `upserted`, in the
    /// order given.
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

    fn next_item(&mut self) -> Option<Item> {
        if let Some(i) = self.carry.take() {
            return Some(i);
        }
        if let Some(e) = self.upserted.next() {
            return Some(Item::Upserted(e));
        }
        self.deleted.next().map(Item::Deleted)
    }
}

impl<I: Iterator<Item = pb::Entry>> Iterator for Pages<I> {
    type Item = pb::SyncMessage;

    fn next(&mut self) -> Option<pb::SyncMessage> {
        if self.done {
            return None;
        }
        let (mut page, mut len) = match self.header.take() {
            Some(h) => {
                let len = h.encoded_len() + self.flag;
                (h, len)
            }
            None => (Self::later_page(self.revision), self.empty),
        };
        loop {
            let Some(item) = self.next_item() else {
                self.done = true;
                page.continued = false;
                return Some(page);
            };
            let n = item.len();
            if len + n > self.bound && len > self.empty {
                self.carry = Some(item);
                page.continued = true;
                return Some(page);
            }
            len += n;
            match item {
                Item::Upserted(e) => page.upserted.push(e),
                Item::Deleted(id) => page.deleted_ids.push(id),
            }
        }
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
