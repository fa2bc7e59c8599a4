//! Decisions from the optimizer, through a cache the data path never waits on.
//!
//! The cache is keyed by context bucket ([`tuning::ConnectionContext::bucket_key`]). A fresh
//! entry (younger than the TTL the optimizer sent) decides at once, per connection, with
//! `tuning`'s own exploration draw and client overrides ([`BucketDecision::for_connection`]).
//! A miss decides at once too, with the service's static settings (reason `fallback`), and asks
//! the optimizer in the background; a stale entry is used (up to `max_stale`) while it is
//! refreshed. The hour of the week is part of a bucket, but an entry answers its bucket in
//! every hour: at the hour's change, last hour's answer is a stale one, used while the new
//! hour's is fetched (keyed by the full bucket, every bucket would fall back once an hour). An unreachable or slow optimizer therefore never delays or fails a connection:
//! it only shows up as `fallback` decisions and in the metrics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tuning::{BucketDecision, ConnectionContext, Decision, Reason};

use crate::config::Service;
use crate::source::SettingsSource;

/// Where the optimizer is and how to talk to it.
#[derive(Debug, Clone)]
pub struct OptimizerConfig {
    /// Base URL, e.g. `http://127.0.0.1:8090`.
    pub url: String,
    /// Bearer token (reader role).
    pub token: Option<String>,
    /// A request slower than this is abandoned (the connection never waited for it anyway).
    pub timeout: Duration,
    /// A stale answer is still used this long after its TTL while a refresh is under way.
    pub max_stale: Duration,
    /// Most buckets kept.
    pub max_entries: usize,
}

/// Cache counters, for metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Decisions from a fresh entry.
    pub hits: AtomicU64,
    /// Decisions from a stale entry (refresh under way).
    pub stale: AtomicU64,
    /// Decisions with no entry (fallback).
    pub misses: AtomicU64,
    /// Optimizer calls that failed or timed out.
    pub errors: AtomicU64,
}

/// The process's cache counters.
pub static CACHE: CacheStats = CacheStats {
    hits: AtomicU64::new(0),
    stale: AtomicU64::new(0),
    misses: AtomicU64::new(0),
    errors: AtomicU64::new(0),
};

#[derive(Debug, Clone)]
struct Entry {
    answer: BucketDecision,
    fetched: Instant,
    /// The hour of the week the answer is for.
    hour: u16,
}

#[derive(Debug)]
struct Inner {
    cfg: OptimizerConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    cache: Mutex<HashMap<String, Entry>>,
    inflight: Mutex<HashSet<String>>,
}

/// The optimizer-backed settings source.
#[derive(Debug, Clone)]
pub struct OptimizerSource {
    inner: Arc<Inner>,
}

impl OptimizerSource {
    /// A source asking the optimizer at `cfg.url`. Must be created inside a tokio runtime.
    pub fn new(cfg: OptimizerConfig) -> OptimizerSource {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(http);
        OptimizerSource {
            inner: Arc::new(Inner {
                cfg,
                client,
                cache: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashSet::new()),
            }),
        }
    }

    fn refresh(&self, key: String, ctx: &ConnectionContext) {
        if !self
            .inner
            .inflight
            .lock()
            .expect("inflight")
            .insert(key.clone())
        {
            return;
        }
        let inner = self.inner.clone();
        // The bucket's answer does not depend on the client key: client overrides come with it.
        let mut ctx = ctx.clone();
        ctx.client_key = None;
        tokio::spawn(async move {
            let t = Instant::now();
            let r = tokio::time::timeout(inner.cfg.timeout, fetch(&inner, &ctx)).await;
            crate::telemetry::OPTIMIZER_CALLS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .observe(t.elapsed().as_secs_f64());
            match r {
                Ok(Ok(answer)) => {
                    let mut c = inner.cache.lock().expect("cache");
                    if c.len() >= inner.cfg.max_entries {
                        let now = Instant::now();
                        c.retain(|_, e| now.duration_since(e.fetched) < ttl(&e.answer));
                        if c.len() >= inner.cfg.max_entries {
                            c.clear();
                        }
                    }
                    c.insert(
                        key.clone(),
                        Entry {
                            answer,
                            fetched: Instant::now(),
                            hour: ctx.hour_of_week,
                        },
                    );
                }
                Ok(Err(e)) => {
                    CACHE.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "optimizer call failed");
                }
                Err(_) => {
                    CACHE.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("optimizer call timed out");
                }
            }
            inner.inflight.lock().expect("inflight").remove(&key);
        });
    }
}

fn ttl(a: &BucketDecision) -> Duration {
    Duration::from_millis(a.ttl_ms.max(1))
}

async fn fetch(inner: &Inner, ctx: &ConnectionContext) -> anyhow::Result<BucketDecision> {
    let body = serde_json::to_vec(ctx)?;
    let mut req = http::Request::post(format!(
        "{}/v1/decisions",
        inner.cfg.url.trim_end_matches('/')
    ))
    .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = &inner.cfg.token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = inner
        .client
        .request(req.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!("optimizer answered {status}");
    }
    Ok(serde_json::from_slice(&bytes)?)
}

impl SettingsSource for OptimizerSource {
    fn decide(
        &self,
        ctx: &ConnectionContext,
        service: &Service,
        connection_id: &uuid::Uuid,
    ) -> Decision {
        let key = ctx.bucket_key_of_any_hour();
        let entry = self.inner.cache.lock().expect("cache").get(&key).cloned();
        let now = Instant::now();
        match entry {
            Some(e)
                if e.hour == ctx.hour_of_week && now.duration_since(e.fetched) < ttl(&e.answer) =>
            {
                CACHE.hits.fetch_add(1, Ordering::Relaxed);
                e.answer
                    .for_connection(ctx.client_key.as_deref(), connection_id)
            }
            Some(e)
                if now.duration_since(e.fetched) < ttl(&e.answer) + self.inner.cfg.max_stale =>
            {
                CACHE.stale.fetch_add(1, Ordering::Relaxed);
                self.refresh(key, ctx);
                e.answer
                    .for_connection(ctx.client_key.as_deref(), connection_id)
            }
            _ => {
                CACHE.misses.fetch_add(1, Ordering::Relaxed);
                self.refresh(key, ctx);
                Decision::fixed(service.settings, Reason::Fallback)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in optimizer: answers every decision request with a model decision whose model
    /// version names the hour of the week it was asked for.
    async fn optimizer() -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + 4 + len {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let ctx: ConnectionContext =
                            serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                        buf.drain(..end + 4 + len);
                        let mut d = Decision::fixed(tuning::Settings::default(), Reason::Model);
                        d.model_version = Some(format!("hour-{}", ctx.hour_of_week));
                        let body = serde_json::to_vec(&BucketDecision {
                            decision: d,
                            exploration: None,
                            client_overrides: Vec::new(),
                            ttl_ms: 60_000,
                            rollout: None,
                        })
                        .unwrap();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_hours_change_answers_from_last_hours_entry_while_it_asks_again() {
        let addr = optimizer().await;
        let source = OptimizerSource::new(OptimizerConfig {
            url: format!("http://{addr}"),
            token: None,
            timeout: Duration::from_secs(5),
            max_stale: Duration::from_secs(300),
            max_entries: 100,
        });
        let config = crate::config::Config::from_toml(
            "listen = \"127.0.0.1:0\"\n[services.chat]\nupstreams = [\"127.0.0.1:9\"]\nroutes = [{ path_prefix = \"/\" }]\n",
        )
        .unwrap();
        let service = &config.services["chat"];
        let ctx = |hour: u16| ConnectionContext {
            service: "chat".into(),
            route: "/".into(),
            protocol: tuning::context::Protocol::Websocket,
            subprotocol: None,
            offers_deflate: false,
            client_class: tuning::context::ClientClass::Browser,
            client_region: "unknown".into(),
            hour_of_week: hour,
            client_key: None,
        };
        let id = uuid::Uuid::new_v4();
        let version = |d: Decision| (d.reason, d.model_version);
        // The first connection of a bucket falls back, and the answer arrives meanwhile.
        assert_eq!(
            version(source.decide(&ctx(5), service, &id)),
            (Reason::Fallback, None)
        );
        // Ask for the hour's bucket until its own answer decides (5 s at most); what decided
        // before it.
        let until_answered = |hour: u16| {
            let (source, ctx) = (&source, &ctx);
            async move {
                let mut before = Vec::new();
                let want = Some(format!("hour-{hour}"));
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let d = version(source.decide(&ctx(hour), service, &id));
                        if d.1 == want {
                            return d;
                        }
                        before.push(d);
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .ok();
                (r, before)
            }
        };
        let (answered, _) = until_answered(5).await;
        assert_eq!(answered, Some((Reason::Model, Some("hour-5".into()))));
        // The next hour: last hour's answer, not the fallback, until the new one is in.
        let next = version(source.decide(&ctx(6), service, &id));
        assert_eq!(next, (Reason::Model, Some("hour-5".into())));
        let (answered, before) = until_answered(6).await;
        for d in before {
            assert_eq!(d, (Reason::Model, Some("hour-5".into())));
        }
        assert_eq!(answered, Some((Reason::Model, Some("hour-6".into()))));
    }
}
