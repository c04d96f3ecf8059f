//! One shape for a query endpoint: its normalized query (parameters, parsing and cache policy:
//! [`EndpointQuery`], in `params`), the statement that answers it (`sql`) and the JSON built from
//! the rows (`render`). [`crate::routes`] serves every [`QueryEndpoint`] with one handler (tenant,
//! cache with single flight, ClickHouse, errors, `ETag`/`Cache-Control`), so a new endpoint is its
//! query type, statement, rendering, a line in the table below and a route.

use bytes::Bytes;
use chute_schema::row::EventsRow;

use crate::params::{EndpointQuery, EventsQuery, SessionsQuery, TimeseriesQuery, TopQuery};
use crate::render::{self, PointRow, SessionRow, TopRow};
use crate::sql::{self, Statement};

/// A query endpoint answering a `Q` with rows `R`: the statement that fetches the rows and the
/// JSON answer built from them.
pub struct QueryEndpoint<Q: EndpointQuery, R> {
    pub statement: fn(&Q) -> Statement,
    pub render: fn(&Q, &[R]) -> Bytes,
}

// By hand: a derive would ask `Q` and `R` to be `Copy` too.
impl<Q: EndpointQuery, R> Clone for QueryEndpoint<Q, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Q: EndpointQuery, R> Copy for QueryEndpoint<Q, R> {}

/// `GET /v1/timeseries`.
pub const TIMESERIES: QueryEndpoint<TimeseriesQuery, PointRow> = QueryEndpoint {
    statement: sql::timeseries,
    render: render::timeseries,
};

/// `GET /v1/top`.
pub const TOP: QueryEndpoint<TopQuery, TopRow> = QueryEndpoint {
    statement: sql::top,
    render: render::top,
};

/// `GET /v1/sessions`.
pub const SESSIONS: QueryEndpoint<SessionsQuery, SessionRow> = QueryEndpoint {
    statement: sql::sessions,
    render: |_, rows| render::sessions(rows),
};

/// `GET /v1/events`.
pub const EVENTS: QueryEndpoint<EventsQuery, EventsRow> = QueryEndpoint {
    statement: sql::events,
    render: |_, rows| render::events(rows),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{touches_now, Params, QueryLimits};

    const NOW: i64 = 1_750_000_000_000;
    const LIMITS: QueryLimits = QueryLimits {
        max_points: 1500,
        max_rows: 1000,
        max_raw_range_ms: 86_400_000,
    };

    /// Whether an answer to `Q` over `[from, to)` (unix ms) is cached as fresh at `NOW`.
    fn fresh<Q: EndpointQuery>(from: i64, to: i64) -> bool {
        let pairs = vec![("from".to_owned(), from.to_string()), ("to".to_owned(), to.to_string())];
        let params = Params::new(pairs, Q::PARAMETERS).unwrap();
        let query = Q::parse("acme", &params, NOW, LIMITS).unwrap();
        touches_now(query.range_end_ms(), NOW)
    }

    #[test]
    fn freshness_follows_the_end_of_each_endpoints_range() {
        let (recent, closed) = ((NOW - 3_600_000, NOW), (NOW - 7_200_000, NOW - 3_600_000));
        for (endpoint, fresh) in [
            ("timeseries", fresh::<TimeseriesQuery> as fn(i64, i64) -> bool),
            ("top", fresh::<TopQuery>),
            ("sessions", fresh::<SessionsQuery>),
            ("events", fresh::<EventsQuery>),
        ] {
            assert!(fresh(recent.0, recent.1), "{endpoint}");
            assert!(!fresh(closed.0, closed.1), "{endpoint}");
        }
    }
}
