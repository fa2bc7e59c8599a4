//! What is known about a connection at decision time, before any payload.

use serde::{Deserialize, Serialize};

/// The application protocol of a connection, as detected by the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Plain HTTP/1.1 request/response.
    Http,
    /// WebSocket (RFC 6455) after an HTTP/1.1 upgrade.
    Websocket,
    /// Any other HTTP Upgrade token, tunnelled as bytes.
    Upgrade,
    /// Raw TCP.
    Tcp,
}

impl Protocol {
    /// All protocols, in feature order.
    pub const ALL: [Protocol; 4] = [
        Protocol::Http,
        Protocol::Websocket,
        Protocol::Upgrade,
        Protocol::Tcp,
    ];

    /// The name used in JSON, SQL and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Websocket => "websocket",
            Protocol::Upgrade => "upgrade",
            Protocol::Tcp => "tcp",
        }
    }
}

/// The user-agent family of a client: coarse on purpose (low cardinality, stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientClass {
    /// A desktop or mobile web browser.
    Browser,
    /// A mobile app's own HTTP stack (okhttp, CFNetwork, Dart).
    Mobile,
    /// A server-side library or CLI (python-websockets, Go, curl, Java, Node).
    Server,
    /// An embedded or IoT device stack.
    Device,
    /// No user agent or one we do not recognise.
    Other,
}

impl ClientClass {
    /// All classes, in feature order.
    pub const ALL: [ClientClass; 5] = [
        ClientClass::Browser,
        ClientClass::Mobile,
        ClientClass::Server,
        ClientClass::Device,
        ClientClass::Other,
    ];

    /// The name used in JSON, SQL and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientClass::Browser => "browser",
            ClientClass::Mobile => "mobile",
            ClientClass::Server => "server",
            ClientClass::Device => "device",
            ClientClass::Other => "other",
        }
    }

    /// Classify a `User-Agent` header value.
    pub fn from_user_agent(ua: Option<&str>) -> ClientClass {
        let Some(ua) = ua else {
            return ClientClass::Other;
        };
        let u = ua.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| u.contains(n));
        if has(&[
            "esp32", "esp8266", "arduino", "mqtt", "iot", "device", "firmware",
        ]) {
            ClientClass::Device
        } else if has(&["okhttp", "cfnetwork", "dart", "darwin/", "android"])
            && !u.contains("mozilla")
        {
            ClientClass::Mobile
        } else if has(&["mozilla", "chrome", "safari", "firefox", "edg/"]) {
            ClientClass::Browser
        } else if has(&[
            "python",
            "websockets",
            "go-http",
            "gorilla",
            "curl",
            "java",
            "node",
            "tungstenite",
            "websocat",
            "rust",
            "trimtab",
            "kubectl",
        ]) {
            ClientClass::Server
        } else {
            ClientClass::Other
        }
    }
}

/// Everything known about a connection before any payload: the input of every decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnectionContext {
    /// The service it was routed to (config name).
    pub service: String,
    /// The route within the service (config name, or the matched path prefix).
    pub route: String,
    /// The detected protocol.
    pub protocol: Protocol,
    /// The WebSocket subprotocol the client offered first, if any.
    #[serde(default)]
    pub subprotocol: Option<String>,
    /// Whether the client offered permessage-deflate.
    #[serde(default)]
    pub offers_deflate: bool,
    /// The client's user-agent family.
    pub client_class: ClientClass,
    /// The client's region, from the configured CIDR table (`"unknown"` when none matches).
    pub client_region: String,
    /// Hour of the week, 0 = Monday 00:00 UTC … 167.
    pub hour_of_week: u16,
    /// A stable key for the client (for overrides and cohorts), e.g. a header or the address.
    #[serde(default)]
    pub client_key: Option<String>,
}

impl ConnectionContext {
    /// The cache bucket of this context: every field a decision may depend on except the
    /// per-connection ones (client key), which the data plane applies locally.
    pub fn bucket_key(&self) -> String {
        format!("{}|{}", self.bucket_key_of_any_hour(), self.hour_of_week)
    }

    /// [`ConnectionContext::bucket_key`] without the hour of the week: the same bucket in
    /// every hour. The data plane keys its cache by it, so that the hour's change finds last
    /// hour's answer to use while it asks for the new one.
    pub fn bucket_key_of_any_hour(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.service,
            self.route,
            self.protocol.as_str(),
            self.subprotocol.as_deref().unwrap_or(""),
            u8::from(self.offers_deflate),
            self.client_class.as_str(),
            self.client_region,
        )
    }
}

/// Hour of the week (0 = Monday 00:00 UTC) for a Unix time in seconds.
pub fn hour_of_week(unix_secs: i64) -> u16 {
    // 1970-01-01 was a Thursday: shift so that Monday is day 0.
    let hours = unix_secs.div_euclid(3600) + 3 * 24;
    u16::try_from(hours.rem_euclid(168)).expect("0..168 fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_agents_map_to_families() {
        let c = ClientClass::from_user_agent;
        assert_eq!(
            c(Some(
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0"
            )),
            ClientClass::Browser
        );
        assert_eq!(c(Some("Python/3.11 websockets/12.0")), ClientClass::Server);
        assert_eq!(c(Some("okhttp/4.12.0")), ClientClass::Mobile);
        assert_eq!(c(Some("esp32-telemetry/1.2")), ClientClass::Device);
        assert_eq!(c(Some("???")), ClientClass::Other);
        assert_eq!(c(None), ClientClass::Other);
    }

    #[test]
    fn hour_of_week_starts_monday() {
        // 2024-01-01 00:00 UTC was a Monday.
        assert_eq!(hour_of_week(1_704_067_200), 0);
        assert_eq!(hour_of_week(1_704_067_200 + 3600 * 25), 25);
        assert_eq!(hour_of_week(1_704_067_200 + 3600 * 168), 0);
        assert_eq!(hour_of_week(0), 72); // Thursday 00:00
    }
}
