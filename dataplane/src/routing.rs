//! Host and path-prefix routing: the longest matching prefix wins; a route with a host beats
//! one without at the same prefix length.

use std::sync::Arc;

use crate::config::{Config, Service};

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    /// The service.
    pub service: Arc<Service>,
    /// The route's name.
    pub route: String,
}

#[derive(Debug)]
struct Entry {
    host: Option<String>,
    prefix: String,
    name: String,
    service: Arc<Service>,
}

/// The routing table built from a validated config.
#[derive(Debug)]
pub struct Router {
    entries: Vec<Entry>,
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

impl Router {
    /// Build from a config.
    pub fn new(config: &Config) -> Router {
        let mut entries = Vec::new();
        for s in config.services.values() {
            let svc = Arc::new(s.clone());
            for r in &s.routes {
                entries.push(Entry {
                    host: r.host.clone(),
                    prefix: r.path_prefix.clone(),
                    name: r.name.clone(),
                    service: svc.clone(),
                });
            }
        }
        // Longest prefix first; host-specific before any-host.
        entries.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Router { entries }
    }

    /// Find the route for a host header value (any case, port ignored) and a path.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<RouteMatch> {
        let host = host.map(|h| {
            let h = h.trim();
            // strip the port, keeping bracketed IPv6 literals intact
            let bare = if h.starts_with('[') {
                h.split_once(']')
                    .map_or(h, |(a, _)| a)
                    .trim_start_matches('[')
            } else {
                h.rsplit_once(':').map_or(h, |(a, _)| a)
            };
            bare.to_ascii_lowercase()
        });
        self.entries
            .iter()
            .find(|e| {
                e.host
                    .as_ref()
                    .is_none_or(|h| host.as_deref() == Some(h.as_str()))
                    && prefix_matches(&e.prefix, path)
            })
            .map(|e| RouteMatch {
                service: e.service.clone(),
                route: e.name.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let c = Config::from_toml(
            r#"
[services.root]
upstreams = ["127.0.0.1:1"]
routes = [{ path_prefix = "/" }]
[services.ws]
upstreams = ["127.0.0.1:2"]
routes = [{ path_prefix = "/ws" }]
[services.special]
upstreams = ["127.0.0.1:3"]
routes = [{ host = "special.example", path_prefix = "/ws", name = "special-ws" }]
"#,
        )
        .unwrap();
        Router::new(&c)
    }

    #[test]
    fn longest_prefix_and_host_win() {
        let r = router();
        let svc = |h, p| r.route(h, p).unwrap().service.name.clone();
        assert_eq!(svc(None, "/ws"), "ws");
        assert_eq!(svc(None, "/ws/room/1"), "ws");
        assert_eq!(svc(None, "/wsx"), "root");
        assert_eq!(svc(Some("SPECIAL.example:8080"), "/ws/a"), "special");
        assert_eq!(
            r.route(Some("special.example"), "/ws").unwrap().route,
            "special-ws"
        );
        assert_eq!(svc(Some("other"), "/ws"), "ws");
        assert_eq!(svc(None, "/"), "root");
    }
}
