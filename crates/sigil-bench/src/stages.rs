//! `--sync-stages N`: where the CPU time of a first sync of N entries goes,
//! stage by stage, in this process and on this thread (thread CPU time, so
//! that other processes on a shared machine change the figures little; best
//! of 3). The entries have the shape of the load generator's sync sweep
//! (one selector, no DNS names, a random UUID as ID) and hang from one
//! agent. The stages are the server's (the authorized set, the record of
//! what was sent, the sort, the encoding of the pages as the code before
//! and after the direct encoder did it), TLS both ways, and the agent's
//! (prost's decoding, the conversion back to `Entry`).

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use rustls::{ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;
use serde_json::json;
use sigil_proto::server::v1 as pb;
use sigil_server::index::EntryIndex;
use sigil_server::sync_pages::{FRAME_PREFIX, PAGE_BYTES, Pages};
use sigil_store::EntrySnapshot;
use sigil_svid::x509::X509Authority;
use sigil_types::{Entry, EntryId, Selectors, SpiffeId};

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(
                    tv.tv_sec().max(0) as u64,
                    (tv.tv_usec().max(0) as u32) * 1000,
                )
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

/// Best of 3 runs of `f` in thread CPU milliseconds, and its last result.
fn best<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..3 {
        drop(last.take());
        let t0 = thread_cpu();
        let out = f()?;
        best = best.min(thread_cpu() - t0);
        last = Some(out);
    }
    Ok((
        best.as_secs_f64() * 1e3,
        last.context("three runs made nothing")?,
    ))
}

/// The `n` entries of one agent, as the sync sweep registers them.
fn entries(n: usize) -> anyhow::Result<(SpiffeId, Vec<Entry>)> {
    let td = sigil_types::TrustDomain::new("example.org")?;
    let agent = td.id_with_path("/sigil/agent/join_token/0123456789abcdef0123456789abcdef")?;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let mut e = crate::sample::sample_entry(&td, &agent, "big1", i)?;
        e.revision = i as u64 + 1;
        v.push(e);
    }
    Ok((agent, v))
}

/// The pages of `upserted` under a snapshot header, as gRPC messages.
fn pages<E: sigil_server::sync_pages::WireEntry>(
    upserted: Vec<E>,
    revision: u64,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let header = pb::SyncMessage {
        revision,
        snapshot: true,
        ..Default::default()
    };
    Ok(Pages::new(header, upserted, PAGE_BYTES).collect::<Result<_, _>>()?)
}

/// What the server did before the direct encoder, from the wire entries
/// on: each entry sized for paging, then each page sized again and encoded
/// by prost into its gRPC message.
fn prost_pages(wire: Vec<pb::Entry>, revision: u64) -> Vec<Vec<u8>> {
    let header = |snapshot| pb::SyncMessage {
        revision,
        snapshot,
        continued: true,
        ..Default::default()
    };
    let mut pages = vec![header(true)];
    let mut len = pages[0].encoded_len();
    let later = header(false).encoded_len();
    for e in wire {
        let n = prost::encoding::message::encoded_len(3, &e);
        if len + n > PAGE_BYTES {
            pages.push(header(false));
            len = later;
        }
        len += n;
        if let Some(p) = pages.last_mut() {
            p.upserted.push(e);
        }
    }
    if let Some(p) = pages.last_mut() {
        p.continued = false;
    }
    pages
        .into_iter()
        .map(|m| {
            let n = m.encoded_len();
            let mut buf = Vec::with_capacity(FRAME_PREFIX + n);
            buf.push(0);
            buf.extend_from_slice(&(n as u32).to_be_bytes());
            m.encode_raw(&mut buf);
            buf
        })
        .collect()
}

/// Runs the stages and prints them as JSON on stdout.
pub(crate) fn run(n: usize) -> anyhow::Result<()> {
    sigil_svid::install_crypto_provider();
    let (agent, list) = entries(n)?;
    let index = EntryIndex::new(EntrySnapshot {
        entries: list,
        revision: n as u64,
    });
    let mut out = serde_json::Map::new();
    let mut stages: Vec<(String, f64)> = Vec::new();
    let mut stage = |name: &str, ms: f64| {
        eprintln!("{name:<28} {ms:9.1} ms");
        stages.push((name.to_owned(), ms));
    };

    let (ms, auth) = best(|| Ok(index.authorized(&agent, &Selectors::new())))?;
    anyhow::ensure!(
        auth.entries.len() == n,
        "the agent holds {} entries",
        auth.entries.len()
    );
    stage("server.authorized_set", ms);
    // The record of what the agent holds: grown (before) or reserved (after).
    for (name, room) in [
        ("server.before.sent_record", 0),
        ("server.after.sent_record", n),
    ] {
        let (ms, sent) = best(|| {
            let mut sent: HashMap<EntryId, u64> = HashMap::with_capacity(room);
            for (id, e) in &auth.entries {
                sent.insert(id.clone(), e.revision);
            }
            Ok(sent)
        })?;
        black_box(sent);
        stage(name, ms);
    }
    let (ms, unsorted) = best(|| Ok(auth.entries.values().cloned().collect::<Vec<Arc<Entry>>>()))?;
    stage("server.collect", ms);
    let (ms, sorted) = best(|| {
        let mut v = unsorted.clone();
        v.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    })?;
    let (clone_ms, _) = best(|| Ok(unsorted.clone()))?;
    stage("server.before.sort", (ms - clone_ms).max(0.0));
    let (ms, after_sort) = best(|| {
        let mut v = unsorted.clone();
        sigil_server::sync_pages::sort_by_id(&mut v);
        Ok(v)
    })?;
    stage("server.after.sort", (ms - clone_ms).max(0.0));
    anyhow::ensure!(
        sorted
            .iter()
            .zip(&after_sort)
            .all(|(a, b)| Arc::ptr_eq(a, b)),
        "the two sorts disagree"
    );
    let (ms, wire) = best(|| {
        Ok(sorted
            .iter()
            .map(|e| pb::Entry::from(e.as_ref()))
            .collect::<Vec<_>>())
    })?;
    stage("server.before.to_wire", ms);
    let (ms, before) = best(|| Ok(prost_pages(wire.clone(), n as u64)))?;
    // `wire.clone()` is not the server's: measured alone, then taken off.
    let (clone_ms, _) = best(|| Ok(wire.clone()))?;
    stage("server.before.size_and_encode", (ms - clone_ms).max(0.0));
    let (ms, after) = best(|| pages(sorted.clone(), n as u64))?;
    stage("server.after.direct_pages", ms);
    anyhow::ensure!(
        before.len() == after.len(),
        "{} pages before, {} after",
        before.len(),
        after.len()
    );
    for (a, b) in before.iter().zip(&after) {
        anyhow::ensure!(a == b, "the direct pages differ from prost's");
    }
    let bytes: usize = after.iter().map(Vec::len).sum();
    out.insert("bytes".into(), json!(bytes));
    out.insert("pages".into(), json!(after.len()));
    out.insert("entries".into(), json!(n));

    // TLS: the pages through a rustls connection pair in memory.
    let ca = X509Authority::generate(
        &sigil_types::TrustDomain::new("example.org")?,
        Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )?;
    let [_, (client_cfg, server_cfg)] = crate::inproc::tls_configs(&ca)?;
    let mut c = ClientConnection::new(client_cfg, ServerName::try_from("bench.example.org")?)?;
    let mut s = ServerConnection::new(server_cfg)?;
    crate::inproc::complete_handshake(&mut c, &mut s)?;
    s.set_buffer_limit(None);
    c.set_buffer_limit(None);
    let mut seal_best = Duration::MAX;
    let mut open_best = Duration::MAX;
    let mut plain = vec![0u8; 64 * 1024];
    for _ in 0..3 {
        let mut records = Vec::with_capacity(bytes + bytes / 64);
        let t0 = thread_cpu();
        for p in &after {
            s.writer().write_all(p)?;
            while s.wants_write() {
                s.write_tls(&mut records)?;
            }
        }
        seal_best = seal_best.min(thread_cpu() - t0);
        let t0 = thread_cpu();
        let mut rd = records.as_slice();
        let mut got = 0;
        while !rd.is_empty() {
            c.read_tls(&mut rd)?;
            c.process_new_packets()?;
            loop {
                match c.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        open_best = open_best.min(thread_cpu() - t0);
        anyhow::ensure!(got == bytes, "TLS carried {got} of {bytes} bytes");
    }
    stage("tls.seal", seal_best.as_secs_f64() * 1e3);
    stage("tls.open", open_best.as_secs_f64() * 1e3);

    let (ms, decoded) = best(|| {
        after
            .iter()
            .map(|f| pb::SyncMessage::decode(&f[FRAME_PREFIX..]).map_err(anyhow::Error::from))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    stage("agent.prost_decode", ms);
    // The agent's apply: each ID parsed to name a refused entry, then the
    // entry parsed (before: its ID a second time).
    let (ms, back) = best(|| {
        let mut v = Vec::with_capacity(n);
        for m in &decoded {
            for e in &m.upserted {
                let id: EntryId = e.id.parse()?;
                v.push(sigil_proto::entry_from_proto(e, move || id)?);
            }
        }
        Ok(v)
    })?;
    anyhow::ensure!(back.len() == n, "decoded {} entries", back.len());
    stage("agent.before.entry_from_proto", ms);
    drop(back);
    let (ms, back) = best(|| {
        let mut v = Vec::with_capacity(n);
        for m in &decoded {
            for e in &m.upserted {
                let id: EntryId = e.id.parse()?;
                v.push(sigil_proto::entry_with_id_from_proto(e, id)?);
            }
        }
        Ok(v)
    })?;
    anyhow::ensure!(back.len() == n, "decoded {} entries", back.len());
    stage("agent.after.entry_from_proto", ms);
    for (name, ms) in stages {
        out.insert(name, json!(ms));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
