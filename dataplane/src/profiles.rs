//! The profile writer: every finished connection becomes one row in PostgreSQL, without the
//! data path ever waiting and without losing rows.
//!
//! ```text
//! connection task ──try_send──► bounded queue ──► writer task ──COPY──► PostgreSQL
//!                                                      │  (on failure or timeout)
//!                                                      ▼
//!                                   append-only spool file (JSON lines, fsync per batch)
//!                                                      │  (when PostgreSQL answers again,
//!                                                      ▼   and first thing after a restart)
//!                                                 replayed in order
//! ```
//!
//! Rows are inserted through a staging table with `ON CONFLICT DO NOTHING` on
//! `(started_at, connection_id)`, so a batch replayed twice (a crash between the write and the
//! spool truncation) is stored once. A row is dropped only when the queue is full or the spool
//! has reached its size limit; every drop is counted and logged.

use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection as _;
use tokio::sync::{mpsc, watch};
use tuning::Profile;

use crate::source::{ProfileSink, log_profile};
use crate::telemetry::METRICS;

/// Writer settings (validated in the config module).
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Directory of the spool files.
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold; beyond it rows are dropped (and counted).
    pub spool_max_bytes: u64,
    /// Capacity of the in-memory queue, rows.
    pub queue_capacity: usize,
    /// Write a batch at this many rows …
    pub batch_rows: usize,
    /// … or after this long, whichever comes first.
    pub batch_interval: Duration,
    /// A database write taking longer than this counts as a failure (rows go to the spool).
    pub write_timeout: Duration,
    /// Rows older than this are deleted (None: keep everything).
    pub retention: Option<Duration>,
}

/// Gauges of the writer, for metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Rows waiting in the queue.
    pub queue_depth: AtomicU64,
    /// Bytes in the spool.
    pub spool_bytes: AtomicU64,
    /// Rows written to PostgreSQL (including replays).
    pub rows_written: AtomicU64,
    /// Rows written to the spool.
    pub rows_spooled: AtomicU64,
}

/// The process's writer gauges.
pub static WRITER: WriterStats = WriterStats {
    queue_depth: AtomicU64::new(0),
    spool_bytes: AtomicU64::new(0),
    rows_written: AtomicU64::new(0),
    rows_spooled: AtomicU64::new(0),
};

/// The sink the data plane hands profiles to: logs the line, queues the row.
#[derive(Debug)]
pub struct PgSink {
    tx: mpsc::Sender<Profile>,
}

impl ProfileSink for PgSink {
    fn emit(&self, p: Profile) {
        log_profile(&p);
        match self.tx.try_send(p) {
            Ok(()) => {
                WRITER.queue_depth.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                METRICS.profiles_dropped.fetch_add(1, Ordering::Relaxed);
                let p = match &e {
                    mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
                };
                tracing::warn!(connection_id = %p.connection_id, "profile queue full: profile dropped");
            }
        }
    }
}

/// The running writer.
#[derive(Debug)]
pub struct Writer {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Writer {
    /// Write (or spool) what is queued and stop, waiting at most `within`.
    pub async fn finish(self, within: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::warn!("profile writer did not finish in time");
        }
    }
}

/// Start the writer; returns the sink to give the data plane and the writer to stop at exit.
pub fn start(cfg: WriterConfig) -> std::io::Result<(Arc<PgSink>, Writer)> {
    std::fs::create_dir_all(&cfg.spool_dir)?;
    let spool = Spool::open(&cfg.spool_dir, cfg.spool_max_bytes)?;
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(cfg, rx, stop_rx, spool));
    Ok((Arc::new(PgSink { tx }), Writer { task, stop }))
}

/// The columns written, in COPY order.
const COLUMNS: &[&str] = &[
    "connection_id",
    "dataplane_id",
    "started_at",
    "ended_at",
    "duration_us",
    "service",
    "route",
    "protocol",
    "subprotocol",
    "offers_deflate",
    "client_class",
    "client_region",
    "hour_of_week",
    "client_key",
    "buffer_size",
    "ping_interval_s",
    "idle_timeout_s",
    "compression",
    "mode",
    "reason",
    "model_version",
    "cohort",
    "propensity",
    "explored",
    "shadow_settings",
    "dns_us",
    "connect_us",
    "tls_us",
    "upgrade_us",
    "c2u_first_message_us",
    "u2c_first_message_us",
    "c2u_bytes",
    "c2u_messages",
    "c2u_msg_size_hist",
    "c2u_read_size_hist",
    "c2u_gap_ms_hist",
    "c2u_max_gap_ms",
    "c2u_sampled_in",
    "c2u_sampled_out",
    "u2c_bytes",
    "u2c_messages",
    "u2c_msg_size_hist",
    "u2c_read_size_hist",
    "u2c_gap_ms_hist",
    "u2c_max_gap_ms",
    "u2c_sampled_in",
    "u2c_sampled_out",
    "client_pings_sent",
    "client_pongs_missed",
    "client_rtt_min_us",
    "client_rtt_p50_us",
    "client_rtt_p99_us",
    "client_rtt_max_us",
    "upstream_pings_sent",
    "upstream_pongs_missed",
    "upstream_rtt_min_us",
    "upstream_rtt_p50_us",
    "upstream_rtt_p99_us",
    "upstream_rtt_max_us",
    "paused_ms",
    "peak_buffered_bytes",
    "closed_by",
    "close_code",
    "close_reason",
    "error_class",
    "dead_peer",
    "idle_timeout_fired",
];

struct Csv<'a>(&'a mut String, bool);

impl Csv<'_> {
    fn sep(&mut self) {
        if self.1 {
            self.0.push(',');
        }
        self.1 = true;
    }
    fn text(&mut self, v: &str) {
        self.sep();
        self.0.push('"');
        for c in v.chars() {
            if c == '"' {
                self.0.push('"');
            }
            if c != '\0' {
                self.0.push(c);
            }
        }
        self.0.push('"');
    }
    fn opt_text(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.text(v),
            None => self.sep(),
        }
    }
    fn num(&mut self, v: impl std::fmt::Display) {
        self.sep();
        let _ = write!(self.0, "{v}");
    }
    fn opt_num<T: std::fmt::Display>(&mut self, v: Option<T>) {
        match v {
            Some(v) => self.num(v),
            None => self.sep(),
        }
    }
    fn boolean(&mut self, v: bool) {
        self.sep();
        self.0.push_str(if v { "t" } else { "f" });
    }
    fn hist(&mut self, h: &tuning::Hist) {
        self.sep();
        self.0.push_str("\"{");
        for (i, c) in h.0.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let _ = write!(self.0, "{c}");
        }
        self.0.push_str("}\"");
    }
}

/// One CSV line for COPY.
fn csv_row(p: &Profile, out: &mut String) {
    let mut w = Csv(out, false);
    let s = &p.decision.settings;
    let ended = p.started_at + chrono::Duration::microseconds(p.duration_us as i64);
    w.text(&p.connection_id.to_string());
    w.text(&p.dataplane_id);
    w.text(&p.started_at.to_rfc3339());
    w.text(&ended.to_rfc3339());
    w.num(p.duration_us);
    let c = &p.context;
    w.text(&c.service);
    w.text(&c.route);
    w.text(c.protocol.as_str());
    w.opt_text(c.subprotocol.as_deref());
    w.boolean(c.offers_deflate);
    w.text(c.client_class.as_str());
    w.text(&c.client_region);
    w.num(c.hour_of_week);
    w.opt_text(c.client_key.as_deref());
    w.num(s.buffer_size);
    w.num(s.ping_interval);
    w.num(s.idle_timeout);
    w.boolean(s.compression);
    w.text(s.mode.as_str());
    let d = &p.decision;
    w.text(d.reason.as_str());
    w.opt_text(d.model_version.as_deref());
    w.text(d.cohort.as_str());
    w.num(d.propensity.clamp(f32::MIN_POSITIVE, 1.0));
    w.boolean(d.explored);
    let shadow = d
        .shadow
        .map(|s| serde_json::to_string(&s).unwrap_or_default());
    w.opt_text(shadow.as_deref());
    let t = &p.timings;
    w.opt_num(t.dns_us);
    w.opt_num(t.connect_us);
    w.opt_num(t.tls_us);
    w.opt_num(t.upgrade_us);
    w.opt_num(p.client_to_upstream.first_message_us);
    w.opt_num(p.upstream_to_client.first_message_us);
    for dir in [&p.client_to_upstream, &p.upstream_to_client] {
        w.num(dir.bytes);
        w.num(dir.messages);
        w.hist(&dir.msg_sizes);
        w.hist(&dir.read_sizes);
        w.hist(&dir.gaps_ms);
        w.num(dir.max_gap_ms);
        w.num(dir.sampled_in);
        w.num(dir.sampled_out);
    }
    for ping in [&p.ping_client, &p.ping_upstream] {
        w.num(ping.sent);
        w.num(ping.missed);
        w.opt_num(ping.rtt_min_us);
        w.opt_num(ping.rtt_p50_us);
        w.opt_num(ping.rtt_p99_us);
        w.opt_num(ping.rtt_max_us);
    }
    w.num(p.paused_ms);
    w.num(p.peak_buffered_bytes);
    w.text(p.closed_by.as_str());
    w.opt_num(p.close_code);
    w.opt_text(p.close_reason.as_deref());
    w.opt_text(p.error_class.as_deref());
    w.boolean(p.dead_peer);
    w.boolean(p.idle_timeout_fired);
    out.push('\n');
}

/// One PostgreSQL connection with its staging table.
struct Db {
    conn: sqlx::PgConnection,
}

impl Db {
    async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query(
            "CREATE TEMP TABLE IF NOT EXISTS profiles_stage (LIKE profiles INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
        )
        .execute(&mut conn)
        .await?;
        Ok(Db { conn })
    }

    async fn write(&mut self, rows: &[Profile]) -> Result<u64, sqlx::Error> {
        let mut data = String::with_capacity(rows.len() * 600);
        for p in rows {
            csv_row(p, &mut data);
        }
        let cols = COLUMNS.join(", ");
        let mut tx = self.conn.begin().await?;
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY profiles_stage ({cols}) FROM STDIN WITH (FORMAT csv)"
            ))
            .await?;
        copy.send(data.into_bytes()).await?;
        copy.finish().await?;
        // The column list is a constant of this module: nothing user-supplied is formatted in.
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO profiles ({cols}) SELECT {cols} FROM profiles_stage ON CONFLICT DO NOTHING"
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// The append-only spool: JSON lines. Appends go to `profiles.spool`; a replay first renames it
/// to `profiles.replaying` so new appends start a fresh file.
#[derive(Debug)]
struct Spool {
    dir: PathBuf,
    max_bytes: u64,
}

impl Spool {
    fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Spool> {
        let s = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
        };
        WRITER.spool_bytes.store(s.bytes(), Ordering::Relaxed);
        Ok(s)
    }

    fn active(&self) -> PathBuf {
        self.dir.join("profiles.spool")
    }

    fn replaying(&self) -> PathBuf {
        self.dir.join("profiles.replaying")
    }

    fn bytes(&self) -> u64 {
        [self.active(), self.replaying()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    fn is_empty(&self) -> bool {
        self.bytes() == 0
    }

    /// Append rows (fsync once). Rows beyond the size limit are dropped and counted.
    fn append(&self, rows: &[Profile]) -> usize {
        let mut buf = Vec::with_capacity(rows.len() * 900);
        let mut kept = 0;
        let room = self.max_bytes.saturating_sub(self.bytes());
        for p in rows {
            let mut line = serde_json::to_vec(p).expect("profiles serialize");
            line.push(b'\n');
            if (buf.len() + line.len()) as u64 > room {
                break;
            }
            buf.extend_from_slice(&line);
            kept += 1;
        }
        let dropped = rows.len() - kept;
        if kept > 0 {
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.active())
                .and_then(|mut f| {
                    f.write_all(&buf)?;
                    f.sync_data()
                });
            if let Err(e) = r {
                tracing::error!(error = %e, rows = rows.len(), "spool write failed: profiles dropped");
                METRICS
                    .profiles_dropped
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                return 0;
            }
            WRITER
                .rows_spooled
                .fetch_add(kept as u64, Ordering::Relaxed);
        }
        if dropped > 0 {
            METRICS
                .profiles_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::error!(
                dropped,
                limit = self.max_bytes,
                "spool full: profiles dropped"
            );
        }
        WRITER.spool_bytes.store(self.bytes(), Ordering::Relaxed);
        kept
    }

    /// Replay the spool in order into the database, in batches. On failure the remaining rows
    /// stay (replaying again later is harmless: inserts ignore rows already stored).
    async fn replay(&self, db: &mut Db, batch: usize, timeout: Duration) -> Result<u64, String> {
        let replaying = self.replaying();
        if !replaying.exists() && self.active().exists() {
            std::fs::rename(self.active(), &replaying).map_err(|e| e.to_string())?;
        }
        if !replaying.exists() {
            return Ok(0);
        }
        let f = std::fs::File::open(&replaying).map_err(|e| e.to_string())?;
        let mut rows = Vec::with_capacity(batch);
        let mut written = 0;
        let mut bad = 0u64;
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(|e| e.to_string())?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Profile>(&line) {
                Ok(p) => rows.push(p),
                Err(e) => {
                    // A torn last line after a crash mid-append: count it, keep going.
                    bad += 1;
                    tracing::warn!(error = %e, "unreadable spool line skipped");
                }
            }
            if rows.len() >= batch {
                written += write_timed(db, &rows, timeout).await?;
                rows.clear();
            }
        }
        if !rows.is_empty() {
            written += write_timed(db, &rows, timeout).await?;
        }
        if bad > 0 {
            METRICS.profiles_dropped.fetch_add(bad, Ordering::Relaxed);
        }
        std::fs::remove_file(&replaying).map_err(|e| e.to_string())?;
        WRITER.spool_bytes.store(self.bytes(), Ordering::Relaxed);
        tracing::info!(rows = written, "spool replayed into PostgreSQL");
        Ok(written)
    }
}

async fn write_timed(db: &mut Db, rows: &[Profile], timeout: Duration) -> Result<u64, String> {
    match tokio::time::timeout(timeout, db.write(rows)).await {
        Ok(Ok(n)) => {
            WRITER.rows_written.fetch_add(n, Ordering::Relaxed);
            Ok(n)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn write_chunks(
    db: &mut Db,
    rows: &[Profile],
    chunk: usize,
    timeout: Duration,
) -> Result<(), String> {
    for c in rows.chunks(chunk.max(1)) {
        write_timed(db, c, timeout).await?;
    }
    Ok(())
}

async fn run(
    cfg: WriterConfig,
    mut rx: mpsc::Receiver<Profile>,
    mut stop: watch::Receiver<bool>,
    spool: Spool,
) {
    let mut db: Option<Db> = None;
    let mut batch: Vec<Profile> = Vec::with_capacity(cfg.batch_rows);
    let mut next_retry = Instant::now();
    let mut last_maintenance = Instant::now() - Duration::from_secs(3600);
    let mut closed = false;
    while !closed {
        // Collect a batch: up to batch_rows, or whatever arrived within batch_interval.
        let deadline = tokio::time::Instant::now() + cfg.batch_interval;
        while batch.len() < cfg.batch_rows {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(p) => {
                        WRITER.queue_depth.fetch_sub(1, Ordering::Relaxed);
                        batch.push(p);
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = async { stop.wait_for(|v| *v).await.is_ok() } => {
                    // Take everything still queued, then write or spool it and stop.
                    while let Ok(p) = rx.try_recv() {
                        WRITER.queue_depth.fetch_sub(1, Ordering::Relaxed);
                        batch.push(p);
                    }
                    closed = true;
                    break;
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // (Re)connect when due; a fresh connection first replays the spool.
        if db.is_none() && Instant::now() >= next_retry {
            match tokio::time::timeout(cfg.write_timeout, Db::connect(&cfg.database_url)).await {
                Ok(Ok(mut d)) => {
                    if spool.is_empty() {
                        db = Some(d);
                    } else {
                        match spool
                            .replay(&mut d, cfg.batch_rows, cfg.write_timeout)
                            .await
                        {
                            Ok(_) => db = Some(d),
                            Err(e) => {
                                tracing::warn!(error = %e, "spool replay failed; will retry");
                                next_retry = Instant::now() + Duration::from_secs(1);
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "PostgreSQL unreachable: spooling profiles");
                    next_retry = Instant::now() + Duration::from_secs(1);
                }
                Err(_) => {
                    tracing::warn!("PostgreSQL connect timed out: spooling profiles");
                    next_retry = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        if let Some(d) = db.as_mut()
            && last_maintenance.elapsed() >= Duration::from_secs(3600)
        {
            last_maintenance = Instant::now();
            maintenance(d, cfg.retention).await;
        }
        if batch.is_empty() {
            continue;
        }
        let written = match db.as_mut() {
            Some(d) => match write_chunks(d, &batch, cfg.batch_rows, cfg.write_timeout).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, rows = batch.len(), "profile write failed: spooling");
                    db = None;
                    next_retry = Instant::now() + Duration::from_secs(1);
                    false
                }
            },
            None => false,
        };
        if !written {
            spool.append(&batch);
        }
        batch.clear();
    }
    tracing::info!("profile writer stopped");
}

/// Create tomorrow's partitions and apply retention (one data plane at a time).
async fn maintenance(db: &mut Db, retention: Option<Duration>) {
    let r = async {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(7446180001)")
            .fetch_one(&mut db.conn)
            .await?;
        if !locked {
            return Ok::<_, sqlx::Error>(());
        }
        sqlx::query("SELECT trimtab_ensure_profile_partitions(current_date, 3)")
            .execute(&mut db.conn)
            .await?;
        if let Some(keep) = retention {
            let secs = keep.as_secs() as f64;
            let n = sqlx::query(
                "DELETE FROM profiles WHERE started_at < now() - make_interval(secs => $1)",
            )
            .bind(secs)
            .execute(&mut db.conn)
            .await?
            .rows_affected();
            if n > 0 {
                tracing::info!(rows = n, "retention: old profiles deleted");
            }
        }
        sqlx::query("SELECT pg_advisory_unlock(7446180001)")
            .execute(&mut db.conn)
            .await?;
        Ok(())
    }
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "profile maintenance failed");
    }
}

/// A representative profile (a WebSocket that exchanged a few messages), for benchmarks.
pub fn sample_profile() -> Profile {
    use tuning::*;
    let mut dir = DirectionStats {
        bytes: 12_000,
        messages: 40,
        ..DirectionStats::default()
    };
    for _ in 0..40 {
        dir.msg_sizes.record(300);
        dir.read_sizes.record(300);
        dir.gaps_ms.record(250);
    }
    let mut p = Profile::new(
        ConnectionContext {
            service: "chat".into(),
            route: "/ws".into(),
            protocol: Protocol::Websocket,
            subprotocol: Some("chat.v1".into()),
            offers_deflate: true,
            client_class: ClientClass::Browser,
            client_region: "eu".into(),
            hour_of_week: 42,
            client_key: Some("10.1.2.3".into()),
        },
        Decision::fixed(Settings::default(), Reason::Default),
    );
    p.connection_id = uuid::Uuid::new_v4();
    p.dataplane_id = "bench".into();
    p.duration_us = 10_000_000;
    p.timings = Timings {
        dns_us: Some(5),
        connect_us: Some(80),
        tls_us: None,
        upgrade_us: Some(400),
    };
    p.client_to_upstream = dir;
    p.upstream_to_client = dir;
    p.peak_buffered_bytes = 600;
    p.close_reason = Some("bye".into());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_text_and_writes_arrays() {
        let mut out = String::new();
        let mut w = Csv(&mut out, false);
        w.text("a \"b\", c");
        w.opt_text(None);
        w.num(5);
        let mut h = tuning::Hist::default();
        h.record(3);
        w.hist(&h);
        assert!(out.starts_with("\"a \"\"b\"\", c\",,5,\"{0,0,1,0"), "{out}");
    }

    #[test]
    fn columns_match_the_row() {
        let mut out = String::new();
        let p = sample();
        csv_row(&p, &mut out);
        // Count fields outside quotes.
        let mut fields = 1;
        let mut quoted = false;
        for c in out.trim_end().chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => fields += 1,
                _ => {}
            }
        }
        assert_eq!(fields, COLUMNS.len());
    }

    pub(crate) fn sample() -> Profile {
        let mut p = super::sample_profile();
        p.context.client_key = Some("k,\"x\"".into());
        p.close_reason = Some("bye, now".into());
        p
    }
}
