//! `nbd://` and `nbds://` URIs.

use crate::proto::DEFAULT_PORT;

use super::ClientError;

/// A parsed `nbd://` or `nbds://` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// `nbds://`: TLS required.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (default 10809).
    pub port: u16,
    /// Export name (percent-decoded; empty for the default export).
    pub export: String,
}

impl NbdUri {
    /// `host:port`, bracketing IPv6 addresses, for `ToSocketAddrs`.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parse `nbd://HOST[:PORT][/EXPORT][?query]` or `nbds://...` (query parameters are ignored).
pub fn parse_uri(uri: &str) -> Result<NbdUri, ClientError> {
    let bad = |why| ClientError::Uri {
        uri: uri.to_string(),
        why,
    };
    let (tls, rest) = if let Some(r) = uri.strip_prefix("nbd://") {
        (false, r)
    } else if let Some(r) = uri.strip_prefix("nbds://") {
        (true, r)
    } else {
        return Err(bad("scheme must be nbd:// or nbds://"));
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let end = r.find(']').ok_or_else(|| bad("unclosed [ in host"))?;
        let host = &r[..end];
        let after = &r[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("junk after ]")),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
        None => DEFAULT_PORT,
    };
    Ok(NbdUri {
        tls,
        host: host.to_string(),
        port,
        export: percent_decode(path).ok_or_else(|| bad("bad percent-encoding in export"))?,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("nbd://127.0.0.1:1234/disk").unwrap(),
            NbdUri {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1234,
                export: "disk".into()
            }
        );
        let u = parse_uri("nbds://[::1]/a%20b?tls-certificates=/x").unwrap();
        assert!(u.tls);
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, DEFAULT_PORT);
        assert_eq!(u.export, "a b");
        assert_eq!(u.addr(), "[::1]:10809");
        assert_eq!(parse_uri("nbd://h").unwrap().export, "");
        for bad in [
            "http://x/y",
            "nbd:///x",
            "nbd://h:99999/",
            "nbd://[::1/x",
            "nbd://h/%zz",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
