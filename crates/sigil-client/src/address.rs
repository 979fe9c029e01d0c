//! Workload API socket addresses: `unix:///absolute/path`, `unix:/absolute/path`
//! or a plain absolute path. The SPIFFE Workload Endpoint specification
//! (§4, "Locating the Endpoint") requires a `unix` URI to carry no
//! authority and an absolute path; sigil serves no TCP endpoint.

use std::path::PathBuf;

/// Why a socket address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// A `unix:` address whose path is not absolute (`unix://foo` names an
    /// authority, not a path).
    #[error("socket address {0:?} must be unix:///absolute/path")]
    NotAbsolute(String),
    /// Neither a `unix:` address nor an absolute path: another scheme such
    /// as `tcp://`, or a relative path.
    #[error("socket address {0:?} must be unix:///absolute/path (TCP is not supported)")]
    NotUnix(String),
}

impl AddressError {
    /// The address as it was given.
    pub fn address(&self) -> &str {
        match self {
            Self::NotAbsolute(a) | Self::NotUnix(a) => a,
        }
    }
}

/// The filesystem path of a socket address (`unix:///path`, `unix:/path` or `/path`).
pub fn socket_path(addr: &str) -> Result<PathBuf, AddressError> {
    let path = if let Some(p) = addr.strip_prefix("unix://") {
        p
    } else if let Some(p) = addr.strip_prefix("unix:") {
        p
    } else if addr.starts_with('/') {
        addr
    } else {
        return Err(AddressError::NotUnix(addr.to_owned()));
    };
    if !path.starts_with('/') {
        return Err(AddressError::NotAbsolute(addr.to_owned()));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        for (addr, path) in [
            ("unix:///tmp/a.sock", "/tmp/a.sock"),
            ("unix:/tmp/a.sock", "/tmp/a.sock"),
            ("/tmp/a.sock", "/tmp/a.sock"),
            (
                "unix:///run/sigil/agent/api.sock",
                "/run/sigil/agent/api.sock",
            ),
        ] {
            assert_eq!(socket_path(addr).unwrap(), PathBuf::from(path), "{addr}");
        }
    }

    #[test]
    fn refused_forms_say_why() {
        for (addr, err, message) in [
            (
                "unix://foo",
                AddressError::NotAbsolute("unix://foo".into()),
                r#"socket address "unix://foo" must be unix:///absolute/path"#,
            ),
            (
                "unix:relative.sock",
                AddressError::NotAbsolute("unix:relative.sock".into()),
                r#"socket address "unix:relative.sock" must be unix:///absolute/path"#,
            ),
            (
                "unix:",
                AddressError::NotAbsolute("unix:".into()),
                r#"socket address "unix:" must be unix:///absolute/path"#,
            ),
            (
                "tcp://127.0.0.1:1",
                AddressError::NotUnix("tcp://127.0.0.1:1".into()),
                r#"socket address "tcp://127.0.0.1:1" must be unix:///absolute/path (TCP is not supported)"#,
            ),
            (
                "relative",
                AddressError::NotUnix("relative".into()),
                r#"socket address "relative" must be unix:///absolute/path (TCP is not supported)"#,
            ),
            (
                "",
                AddressError::NotUnix(String::new()),
                r#"socket address "" must be unix:///absolute/path (TCP is not supported)"#,
            ),
        ] {
            let got = socket_path(addr).unwrap_err();
            assert_eq!(got, err, "{addr}");
            assert_eq!(got.to_string(), message, "{addr}");
            assert_eq!(got.address(), addr);
        }
    }
}
