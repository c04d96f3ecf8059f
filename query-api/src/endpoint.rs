//! One shape for a query endpoint: what it accepts, how that parses into a normalized query, the
//! statement that answers it, the JSON built from the rows and how long the answer may be
//! cached. [`crate::routes`] serves every [`QueryEndpoint`] with one handler (tenant, cache with
//! single flight, ClickHouse, errors, `ETag`/`Cache-Control`), so a new endpoint is its parsing
//! (`params`), statement (`sql`), rendering (`render`), an impl here and a route.

use bytes::Bytes;
use clickhouse::RowOwned;

use crate::error::Result;
use crate::params::{EventsQuery, Params, QueryLimits, SessionsQuery, TimeseriesQuery, TopQuery};
use crate::render::{self, PointRow, SessionRow, StoredEvent, TopRow};
use crate::sql::{self, Statement};

pub trait QueryEndpoint: 'static {
    /// The normalized query: what the statement and the answer are built from; its `Debug` text
    /// is the cache key (so it names the endpoint and every normalized parameter).
    type Query: std::fmt::Debug + Send + 'static;
    /// One row of the statement's result (`RowOwned + DeserializeOwned` is `clickhouse::RowRead`
    /// for owned rows, spelled out: an associated type does not inherit `RowRead`'s where-clause).
    type Row: RowOwned + serde::de::DeserializeOwned + Send;

    /// The accepted query parameters; any other is a 400 naming it.
    const PARAMETERS: &'static [&'static str];

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<Self::Query>;

    fn statement(query: &Self::Query) -> Statement;

    fn render(query: &Self::Query, rows: &[Self::Row]) -> Bytes;

    /// Cache policy: where the answer's range ends (unix ms). An answer whose range touches the
    /// last two minutes is still filling and lives the fresh TTL, others the historical one
    /// (`params::touches_now`).
    fn range_end_ms(query: &Self::Query) -> i64;
}

/// `GET /v1/timeseries`.
pub struct Timeseries;

impl QueryEndpoint for Timeseries {
    type Query = TimeseriesQuery;
    type Row = PointRow;
    const PARAMETERS: &'static [&'static str] = TimeseriesQuery::PARAMETERS;

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<TimeseriesQuery> {
        TimeseriesQuery::parse(tenant, params, now_ms, limits)
    }

    fn statement(query: &TimeseriesQuery) -> Statement {
        sql::timeseries(query)
    }

    fn render(query: &TimeseriesQuery, rows: &[PointRow]) -> Bytes {
        render::timeseries(query, rows)
    }

    fn range_end_ms(query: &TimeseriesQuery) -> i64 {
        query.to * 1000
    }
}

/// `GET /v1/top`.
pub struct Top;

impl QueryEndpoint for Top {
    type Query = TopQuery;
    type Row = TopRow;
    const PARAMETERS: &'static [&'static str] = TopQuery::PARAMETERS;

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<TopQuery> {
        TopQuery::parse(tenant, params, now_ms, limits)
    }

    fn statement(query: &TopQuery) -> Statement {
        sql::top(query)
    }

    fn render(query: &TopQuery, rows: &[TopRow]) -> Bytes {
        render::top(query, rows)
    }

    fn range_end_ms(query: &TopQuery) -> i64 {
        query.to_ms
    }
}

/// `GET /v1/sessions`.
pub struct Sessions;

impl QueryEndpoint for Sessions {
    type Query = SessionsQuery;
    type Row = SessionRow;
    const PARAMETERS: &'static [&'static str] = SessionsQuery::PARAMETERS;

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<SessionsQuery> {
        SessionsQuery::parse(tenant, params, now_ms, limits)
    }

    fn statement(query: &SessionsQuery) -> Statement {
        sql::sessions(query)
    }

    fn render(_query: &SessionsQuery, rows: &[SessionRow]) -> Bytes {
        render::sessions(rows)
    }

    fn range_end_ms(query: &SessionsQuery) -> i64 {
        query.to_ms
    }
}

/// `GET /v1/events`.
pub struct Events;

impl QueryEndpoint for Events {
    type Query = EventsQuery;
    type Row = StoredEvent;
    const PARAMETERS: &'static [&'static str] = EventsQuery::PARAMETERS;

    fn parse(tenant: &str, params: &Params, now_ms: i64, limits: QueryLimits) -> Result<EventsQuery> {
        EventsQuery::parse(tenant, params, now_ms, limits)
    }

    fn statement(query: &EventsQuery) -> Statement {
        sql::events(query)
    }

    fn render(_query: &EventsQuery, rows: &[StoredEvent]) -> Bytes {
        render::events(rows)
    }

    fn range_end_ms(query: &EventsQuery) -> i64 {
        query.to_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::touches_now;

    const NOW: i64 = 1_750_000_000_000;
    const LIMITS: QueryLimits = QueryLimits {
        max_points: 1500,
        max_rows: 1000,
        max_raw_range_ms: 86_400_000,
    };

    /// Whether `E` caches an answer over `[from, to)` (unix ms) as fresh at `NOW`.
    fn fresh<E: QueryEndpoint>(from: i64, to: i64) -> bool {
        let pairs = vec![("from".to_owned(), from.to_string()), ("to".to_owned(), to.to_string())];
        let params = Params::new(pairs, E::PARAMETERS).unwrap();
        let query = E::parse("acme", &params, NOW, LIMITS).unwrap();
        touches_now(E::range_end_ms(&query), NOW)
    }

    #[test]
    fn freshness_follows_the_end_of_each_endpoints_range() {
        let (recent, closed) = ((NOW - 3_600_000, NOW), (NOW - 7_200_000, NOW - 3_600_000));
        for (endpoint, fresh) in [
            ("timeseries", fresh::<Timeseries> as fn(i64, i64) -> bool),
            ("top", fresh::<Top>),
            ("sessions", fresh::<Sessions>),
            ("events", fresh::<Events>),
        ] {
            assert!(fresh(recent.0, recent.1), "{endpoint}");
            assert!(!fresh(closed.0, closed.1), "{endpoint}");
        }
    }
}
