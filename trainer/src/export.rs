//! `trainer export`: a window of profiles with their features and hindsight labels as a polars
//! DataFrame, written as Parquet or CSV for notebooks.

use std::path::Path;

use polars::prelude::*;
use tuning::Target;

use crate::learn::Dataset;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Apache Parquet.
    Parquet,
    /// Comma-separated values with a header.
    Csv,
}

/// The training table with the context, settings used and decision, key traffic figures and
/// the replay cost beside it: every feature (`f_<name>`), class label (`y_<target>`), row weight
/// (`w_<target>`) and label as its grid value (`label_<target>`).
pub fn frame(d: &Dataset, w: &tuning::cost::CostWeights) -> PolarsResult<DataFrame> {
    let p = &d.profiles;
    let n = p.len();
    let text = |name: &str, f: &dyn Fn(&tuning::Profile) -> String| {
        Column::new(name.into(), p.iter().map(f).collect::<Vec<String>>())
    };
    let int = |name: &str, f: &dyn Fn(&tuning::Profile) -> i64| {
        Column::new(name.into(), p.iter().map(f).collect::<Vec<i64>>())
    };
    let mut cols = vec![
        text("connection_id", &|x| x.connection_id.to_string()),
        text("started_at", &|x| x.started_at.to_rfc3339()),
        text("service", &|x| x.context.service.clone()),
        text("route", &|x| x.context.route.clone()),
        text("protocol", &|x| x.context.protocol.as_str().into()),
        text("client_class", &|x| x.context.client_class.as_str().into()),
        text("client_region", &|x| x.context.client_region.clone()),
        int("hour_of_week", &|x| i64::from(x.context.hour_of_week)),
        int("buffer_size", &|x| {
            i64::from(x.decision.settings.buffer_size)
        }),
        int("ping_interval", &|x| {
            i64::from(x.decision.settings.ping_interval)
        }),
        int("idle_timeout", &|x| {
            i64::from(x.decision.settings.idle_timeout)
        }),
        int("compression", &|x| {
            i64::from(x.decision.settings.compression)
        }),
        text("mode", &|x| x.decision.settings.mode.as_str().into()),
        text("reason", &|x| x.decision.reason.as_str().into()),
        text("cohort", &|x| x.decision.cohort.as_str().into()),
        Column::new(
            "propensity".into(),
            p.iter()
                .map(|x| x.decision.propensity)
                .collect::<Vec<f32>>(),
        ),
        int("duration_us", &|x| x.duration_us as i64),
        int("c2u_bytes", &|x| x.client_to_upstream.bytes as i64),
        int("u2c_bytes", &|x| x.upstream_to_client.bytes as i64),
        int("c2u_messages", &|x| x.client_to_upstream.messages as i64),
        int("u2c_messages", &|x| x.upstream_to_client.messages as i64),
        int("close_code", &|x| x.close_code.map_or(-1, i64::from)),
        int("dead_peer", &|x| i64::from(x.dead_peer)),
        int("idle_timeout_fired", &|x| i64::from(x.idle_timeout_fired)),
        Column::new(
            "replay_cost".into(),
            p.iter()
                .map(|x| tuning::cost::replay_cost(x, &x.decision.settings, w))
                .collect::<Vec<f64>>(),
        ),
    ];
    // The training table itself: features, class labels and row weights.
    for c in d.table.columns() {
        if c.name() != "started_at" && c.name() != "service" {
            cols.push(c.clone());
        }
    }
    for t in Target::ALL.iter() {
        let values: Vec<String> = d
            .labels(*t)
            .map_err(|e| PolarsError::ComputeError(e.to_string().into()))?
            .iter()
            .map(|c| {
                let mut s = tuning::Settings::default();
                t.set_class(&mut s, *c);
                match t {
                    Target::BufferSize => s.buffer_size.to_string(),
                    Target::PingInterval => s.ping_interval.to_string(),
                    Target::IdleTimeout => s.idle_timeout.to_string(),
                    Target::Compression => s.compression.to_string(),
                    Target::Mode => s.mode.as_str().to_string(),
                }
            })
            .collect();
        cols.push(Column::new(format!("label_{}", t.name()).into(), values));
    }
    DataFrame::new(n, cols)
}

/// Write the frame to `path`.
pub fn write(df: &mut DataFrame, path: &Path, format: Format) -> PolarsResult<()> {
    let file = std::fs::File::create(path)?;
    match format {
        Format::Parquet => ParquetWriter::new(file).finish(df).map(|_| ()),
        Format::Csv => CsvWriter::new(file).finish(df),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[sqlx::test(migrations = "../migrations")]
    async fn exports_features_and_labels_as_parquet_and_csv(db: sqlx::PgPool) {
        crate::synthetic::insert(&db, 90).await.unwrap();
        let w = crate::Window {
            since: chrono::Utc::now() - chrono::Duration::hours(3),
            until: chrono::Utc::now() + chrono::Duration::seconds(1),
            service: None,
        };
        let weights = tuning::cost::CostWeights::default();
        let d = crate::learn::dataset(crate::load(&db, &w).await.unwrap(), &weights).unwrap();
        let mut df = frame(&d, &weights).unwrap();
        assert_eq!(df.height(), 90);
        assert_eq!(df.width(), 25 + tuning::feature_len() + 3 * 5);
        let dir = std::env::temp_dir().join(format!("trimtab-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("p.csv");
        write(&mut df, &csv, Format::Csv).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        let header = text.lines().next().unwrap();
        assert!(
            header.starts_with("connection_id,started_at,service"),
            "{header}"
        );
        assert!(header.contains("label_buffer_size") && header.contains("f_offers_deflate"));
        assert_eq!(text.lines().count(), 91);
        let pq = dir.join("p.parquet");
        write(&mut df, &pq, Format::Parquet).unwrap();
        let back = ParquetReader::new(std::fs::File::open(&pq).unwrap())
            .finish()
            .unwrap();
        assert_eq!(back.shape(), df.shape());
    }
}
