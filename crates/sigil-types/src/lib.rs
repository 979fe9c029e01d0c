//! Validated identity types shared by every sigil crate.
//!
//! Nothing here does I/O or cryptography: these are the values that travel
//! between the server, the agent, the store and the command line, each checked
//! once at the boundary where it enters the system.
//!
//! | module | what it holds |
//! |---|---|
//! | [`spiffe_id`] | [`TrustDomain`] and [`SpiffeId`], per the SPIFFE ID standard |
//! | [`selector`] | [`Selector`] (`type:value`) and the canonical [`Selectors`] set |
//! | [`entry`] | registration [`Entry`] and its validation |
//! | [`agent`] | the server's record of an attested agent |
//! | [`attribute`] | identity attributes carried in credentials |
//! | [`federation`] | federation relationships with other trust domains |
//! | [`bundle`] | the SPIFFE bundle document (JWKS with SPIFFE members) |
//! | [`duration`] | human durations such as `30s` or `1h` |
//! | [`config`] | the error of loading a configuration file |
//! | [`ratelimit`] | a keyed token-bucket rate limiter with bounded memory |
//! | [`slots`] | open-connection counts capped per key (uid, source address) |

pub mod agent;
pub mod attribute;
pub mod bundle;
pub mod config;
pub mod duration;
pub mod entry;
pub mod federation;
pub mod ratelimit;
pub mod selector;
pub mod slots;
pub mod spiffe_id;
pub mod text;

pub use agent::{AgentRecord, SerialStatus};

/// A future behind `dyn`, as returned by the entry points one sigil crate
/// offers another (`sigil_server::start`, `sigil_agent::start`, ...).
///
/// rustc compiles the body of an `async fn` in every crate that awaits it,
/// as it does a generic function's: a binary awaiting the server's `start`
/// directly compiles the whole server a second time. Behind `dyn` the body
/// is compiled once, in its own crate (docs/benchmarks.md, "First build").
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// [`BoxFuture`] without `Send`, for the few entry points whose future the
/// compiler cannot prove `Send` behind `dyn` (higher-ranked lifetimes inside
/// sqlx); they are awaited, never spawned.
pub type LocalBoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;
pub use attribute::Attribute;
pub use bundle::{BundleDocument, Jwk};
pub use entry::{Entry, EntryError, EntryId};
pub use federation::{BundleEndpointProfile, FederationRelationship};
pub use selector::{Selector, SelectorError, Selectors};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// The path under which sigil names its own components (`spiffe://<td>/sigil/...`).
pub const SIGIL_PATH_PREFIX: &str = "/sigil";

/// The SPIFFE ID path of the server (`spiffe://<td>/sigil/server`); entries
/// parented to it are node aliases.
pub const SERVER_PATH: &str = "/sigil/server";

/// The path prefix of agent IDs (`spiffe://<td>/sigil/agent/<method>/...`).
pub const AGENT_PATH_PREFIX: &str = "/sigil/agent";
