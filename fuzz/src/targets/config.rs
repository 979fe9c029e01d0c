//! Server and agent TOML configuration files: parsing arbitrary text never
//! panics (bad files get a [`ConfigError`](sigil_types::config::ConfigError)).

use sigil_agent::AgentConfig;
use sigil_server::ServerConfig;

/// Runs one fuzz input through this target: panics (fails) only on a broken property.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ServerConfig::parse(text, None);
    let _ = AgentConfig::parse(text, None);
}
