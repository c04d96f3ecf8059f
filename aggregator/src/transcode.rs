//! One pass from a JetStream message (`EventBatch` protobuf) to the RowBinary rows of `events`,
//! validating while it reads: no `EventBatch`, no `String`s, no per-event allocation.
//!
//! The transcoder is a fast *accept*. It returns rows only for a message that
//! [`crate::row::reference`] (prost decode, `validate::check`, `EventsRow`) accepts too, with
//! byte-identical rows; anything it does not accept (undecodable, unknown version, an invalid
//! event, or a protobuf form it does not handle, such as groups) it leaves to the reference,
//! which gives the verdict and the error text. So poison verdicts and texts are the reference's
//! by construction, and the proptest below proves the accepted half equal.
//!
//! Protobuf semantics kept (what prost does): the last value of a repeated scalar or string
//! wins, a repeated `time` merges field by field, unknown fields are skipped, every string must be
//! UTF-8, and a map keeps the last value of a duplicated key. Map entries are written sorted by
//! key, so the same message always gives the same bytes (prost's `HashMap` has no order).

use chute_common::validate::{is_valid_name, is_valid_tenant, Limits};
use chute_proto::BATCH_VERSION;
use uuid::Uuid;

/// What an accepted message added to the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcoded {
    /// Rows appended (one per event).
    pub events: usize,
    pub received_unix_nanos: i64,
}

/// A byte range of the payload being read.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: usize,
    end: usize,
}

/// Reusable scratch space: one transcoder per batch allocates only while its vectors grow.
#[derive(Debug, Default)]
pub struct Transcoder {
    events: Vec<Span>,
    attributes: Vec<(Span, Span)>,
    metrics: Vec<(Span, f64)>,
}

/// The fields of one event as spans of the payload.
#[derive(Default)]
struct EventFields {
    event_id: Span,
    tenant: Span,
    name: Span,
    /// (seconds, nanos) when `time` is present.
    time: Option<(i64, i32)>,
    session_id: Span,
    user_id: Span,
    body: Span,
}

impl Transcoder {
    /// Appends the rows of `payload` to `out` and says how many, or returns `None` with `out`
    /// unchanged when the message is not accepted here (the reference decides it then).
    pub fn transcode(&mut self, payload: &[u8], limits: &Limits, out: &mut Vec<u8>) -> Option<Transcoded> {
        let start = out.len();
        let transcoded = self.transcode_into(payload, limits, out);
        if transcoded.is_none() {
            out.truncate(start);
        }
        transcoded
    }

    fn transcode_into(&mut self, payload: &[u8], limits: &Limits, out: &mut Vec<u8>) -> Option<Transcoded> {
        // The header may follow the events on the wire, so read it first and keep event spans.
        self.events.clear();
        let (mut version, mut received) = (0u32, 0i64);
        let mut reader = Reader::new(payload, 0, payload.len());
        while !reader.done() {
            let (field, wire) = reader.key()?;
            match (field, wire) {
                (1, VARINT) => version = reader.varint()? as u32,
                (2, VARINT) => received = reader.varint()? as i64,
                (3, LEN) => {
                    reader.string()?;
                }
                (4 | 5, VARINT) => {
                    reader.varint()?;
                }
                (6, LEN) => self.events.push(reader.span()?),
                (1..=6, _) => return None,
                _ => reader.skip(wire)?,
            }
        }
        if version != BATCH_VERSION {
            return None;
        }
        let window = TimeWindow::new(received, limits);
        let ingested_at = received.div_euclid(1_000_000);
        for index in 0..self.events.len() {
            let span = self.events[index];
            let fields = self.read_event(payload, span)?;
            let event = self.check(payload, &fields, &window, limits)?;
            self.write_row(payload, &fields, event, ingested_at, out);
        }
        Some(Transcoded {
            events: self.events.len(),
            received_unix_nanos: received,
        })
    }

    fn read_event(&mut self, payload: &[u8], span: Span) -> Option<EventFields> {
        self.attributes.clear();
        self.metrics.clear();
        let mut fields = EventFields::default();
        let mut reader = Reader::new(payload, span.start, span.end);
        while !reader.done() {
            let (field, wire) = reader.key()?;
            match (field, wire) {
                (1, LEN) => fields.event_id = reader.string()?,
                (2, LEN) => fields.tenant = reader.string()?,
                (3, LEN) => fields.name = reader.string()?,
                (4, LEN) => fields.time = Some(read_timestamp(payload, reader.span()?, fields.time)?),
                (5, LEN) => fields.session_id = reader.string()?,
                (6, LEN) => fields.user_id = reader.string()?,
                (7, LEN) => {
                    let entry = read_attribute(payload, reader.span()?)?;
                    self.attributes.push(entry);
                }
                (8, LEN) => {
                    let entry = read_metric(payload, reader.span()?)?;
                    self.metrics.push(entry);
                }
                (9, LEN) => fields.body = reader.string()?,
                (1..=9, _) => return None,
                _ => reader.skip(wire)?,
            }
        }
        // Sorted by key, the last value of a duplicated key kept: reversed, a stable sort puts
        // the last occurrence first among equals, and `dedup` keeps the first.
        let key = |span: &Span| &payload[span.start..span.end];
        self.attributes.reverse();
        self.attributes.sort_by(|a, b| key(&a.0).cmp(key(&b.0)));
        self.attributes.dedup_by(|later, kept| key(&later.0) == key(&kept.0));
        self.metrics.reverse();
        self.metrics.sort_by(|a, b| key(&a.0).cmp(key(&b.0)));
        self.metrics.dedup_by(|later, kept| key(&later.0) == key(&kept.0));
        Some(fields)
    }

    /// `validate::check`, as a yes/no over spans. Returns the parsed id and time in ms.
    fn check(&self, payload: &[u8], fields: &EventFields, window: &TimeWindow, limits: &Limits) -> Option<(Uuid, i64)> {
        // Already checked to be UTF-8 when read.
        let text = |span: Span| std::str::from_utf8(&payload[span.start..span.end]).ok();
        if !is_valid_tenant(text(fields.tenant)?) || !is_valid_name(text(fields.name)?) {
            return None;
        }
        let event_id = Uuid::try_parse_ascii(&payload[fields.event_id.start..fields.event_id.end]).ok()?;
        let (seconds, nanos) = fields.time?;
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        let time = seconds.checked_mul(1_000_000_000)?.checked_add(i64::from(nanos))?;
        if time < window.earliest || time > window.latest {
            return None;
        }
        let len = |span: Span| span.end - span.start;
        if len(fields.session_id) > limits.max_id_bytes
            || len(fields.user_id) > limits.max_id_bytes
            || self.attributes.len() > limits.max_attributes
            || self.metrics.len() > limits.max_metrics
            || len(fields.body) > limits.max_body_bytes
        {
            return None;
        }
        let key = |span: Span| &payload[span.start..span.end];
        for &(name, value) in &self.attributes {
            if !valid_key(key(name), limits) || len(value) > limits.max_attribute_value_bytes {
                return None;
            }
        }
        for &(name, value) in &self.metrics {
            if !valid_key(key(name), limits) || !value.is_finite() {
                return None;
            }
        }
        Some((event_id, time.div_euclid(1_000_000)))
    }

    /// One row in the column order of `EventsRow`.
    fn write_row(
        &self,
        payload: &[u8],
        fields: &EventFields,
        (event_id, time_ms): (Uuid, i64),
        ingested_at: i64,
        out: &mut Vec<u8>,
    ) {
        let bytes = |span: Span| &payload[span.start..span.end];
        put_string(out, bytes(fields.tenant));
        put_string(out, bytes(fields.name));
        out.extend_from_slice(&time_ms.to_le_bytes());
        put_uuid(out, event_id);
        put_string(out, bytes(fields.session_id));
        put_string(out, bytes(fields.user_id));
        put_varint(out, self.attributes.len() as u64);
        for &(key, value) in &self.attributes {
            put_string(out, bytes(key));
            put_string(out, bytes(value));
        }
        put_varint(out, self.metrics.len() as u64);
        for &(key, value) in &self.metrics {
            put_string(out, bytes(key));
            out.extend_from_slice(&value.to_le_bytes());
        }
        put_string(out, bytes(fields.body));
        out.extend_from_slice(&ingested_at.to_le_bytes());
    }
}

/// `validate::check_key` as a yes/no, over a key already checked to be UTF-8.
fn valid_key(key: &[u8], limits: &Limits) -> bool {
    if key.is_empty() || key.len() > limits.max_key_bytes {
        return false;
    }
    if key.is_ascii() {
        // The ASCII control characters (`char::is_control`): C0 and DEL.
        return !key.iter().any(|&b| b < 0x20 || b == 0x7f);
    }
    std::str::from_utf8(key).is_ok_and(|key| !key.chars().any(char::is_control))
}

/// The accepted event times, anchored at the batch's receive time (as `validate::check_time`).
struct TimeWindow {
    earliest: i64,
    latest: i64,
}

impl TimeWindow {
    fn new(received_unix_nanos: i64, limits: &Limits) -> Self {
        Self {
            earliest: received_unix_nanos.saturating_sub(limits.max_past.as_nanos() as i64),
            latest: received_unix_nanos.saturating_add(limits.max_future.as_nanos() as i64),
        }
    }
}

/// A `Timestamp`, merged into the previous occurrence like prost does.
fn read_timestamp(payload: &[u8], span: Span, previous: Option<(i64, i32)>) -> Option<(i64, i32)> {
    let (mut seconds, mut nanos) = previous.unwrap_or_default();
    let mut reader = Reader::new(payload, span.start, span.end);
    while !reader.done() {
        let (field, wire) = reader.key()?;
        match (field, wire) {
            (1, VARINT) => seconds = reader.varint()? as i64,
            (2, VARINT) => nanos = reader.varint()? as i32,
            (1 | 2, _) => return None,
            _ => reader.skip(wire)?,
        }
    }
    Some((seconds, nanos))
}

/// A `map<string, string>` entry; an absent key or value is empty.
fn read_attribute(payload: &[u8], span: Span) -> Option<(Span, Span)> {
    let empty = Span {
        start: span.start,
        end: span.start,
    };
    let (mut key, mut value) = (empty, empty);
    let mut reader = Reader::new(payload, span.start, span.end);
    while !reader.done() {
        let (field, wire) = reader.key()?;
        match (field, wire) {
            (1, LEN) => key = reader.string()?,
            (2, LEN) => value = reader.string()?,
            (1 | 2, _) => return None,
            _ => reader.skip(wire)?,
        }
    }
    Some((key, value))
}

/// A `map<string, double>` entry; an absent key is empty, an absent value 0.
fn read_metric(payload: &[u8], span: Span) -> Option<(Span, f64)> {
    let (mut key, mut value) = (
        Span {
            start: span.start,
            end: span.start,
        },
        0.0,
    );
    let mut reader = Reader::new(payload, span.start, span.end);
    while !reader.done() {
        let (field, wire) = reader.key()?;
        match (field, wire) {
            (1, LEN) => key = reader.string()?,
            (2, FIXED64) => value = f64::from_le_bytes(reader.fixed::<8>()?),
            (1 | 2, _) => return None,
            _ => reader.skip(wire)?,
        }
    }
    Some((key, value))
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Protobuf wire reading over `payload[pos..end]`; `None` on anything malformed.
struct Reader<'a> {
    payload: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(payload: &'a [u8], pos: usize, end: usize) -> Self {
        Self { payload, pos, end }
    }

    fn done(&self) -> bool {
        self.pos >= self.end
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = *self.payload[..self.end].get(self.pos)?;
            self.pos += 1;
            // The tenth byte may only hold the top bit of a u64 (prost refuses more).
            if shift == 63 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }

    /// (field number, wire type); field 0, keys beyond u32 and wire types above 5 are refused.
    fn key(&mut self) -> Option<(u32, u8)> {
        let key = self.varint()?;
        let key = u32::try_from(key).ok()?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        (field >= 1 && wire <= 5).then_some((field, wire))
    }

    fn span(&mut self) -> Option<Span> {
        let len = usize::try_from(self.varint()?).ok()?;
        if len > self.end - self.pos {
            return None;
        }
        let span = Span {
            start: self.pos,
            end: self.pos + len,
        };
        self.pos += len;
        Some(span)
    }

    /// A length-delimited field that must be UTF-8 (a protobuf `string`).
    fn string(&mut self) -> Option<Span> {
        let span = self.span()?;
        let bytes = &self.payload[span.start..span.end];
        // `is_ascii` first: most strings are ASCII, and it is much cheaper for short ones.
        if !bytes.is_ascii() {
            std::str::from_utf8(bytes).ok()?;
        }
        Some(span)
    }

    fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.end - self.pos < N {
            return None;
        }
        let bytes = self.payload[self.pos..self.pos + N].try_into().ok()?;
        self.pos += N;
        Some(bytes)
    }

    /// Skips an unknown field. Groups (deprecated, never in our schema) are left to the reference.
    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.fixed::<8>().map(drop),
            LEN => self.span().map(drop),
            FIXED32 => self.fixed::<4>().map(drop),
            _ => None,
        }
    }
}

/// How many events an `EventBatch` payload holds (its field 6), by walking the top-level fields
/// without decoding any of them: batch sizing needs the count long before the rows are written.
/// `None` when the payload is not well-formed protobuf (the commit path dead-letters it).
pub fn count_events(payload: &[u8]) -> Option<usize> {
    const EVENTS_FIELD: u32 = 6;
    let mut reader = Reader::new(payload, 0, payload.len());
    let mut events = 0;
    while !reader.done() {
        let (field, wire) = reader.key()?;
        if field == EVENTS_FIELD && wire == LEN {
            events += 1;
        }
        reader.skip(wire)?;
    }
    Some(events)
}

/// RowBinary's unsigned LEB128 length prefix.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A RowBinary `String` (also `LowCardinality(String)`).
pub fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A RowBinary `UUID`: the high then the low 64 bits, each little-endian (as the `clickhouse`
/// crate's `serde::uuid` writes it).
pub fn put_uuid(out: &mut Vec<u8>, uuid: Uuid) {
    let (high, low) = uuid.as_u64_pair();
    out.extend_from_slice(&high.to_le_bytes());
    out.extend_from_slice(&low.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use chute_common::validate::timestamp_from_nanos;
    use chute_proto::v1::{Event, EventBatch};
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::consumer::PartitionMessage;
    use crate::row::{encode, encode_reference, reference};

    const NOW: i64 = 1_780_000_000_123_456_789;

    /// Small limits, so that random events cross every one of them.
    fn limits() -> Limits {
        Limits {
            max_attributes: 3,
            max_metrics: 3,
            max_key_bytes: 8,
            max_attribute_value_bytes: 16,
            max_body_bytes: 32,
            max_id_bytes: 16,
            max_past: Duration::from_secs(3600),
            max_future: Duration::from_secs(60),
        }
    }

    /// Mostly valid values, so that most messages are accepted, and every kind of invalid one.
    fn event_id() -> impl Strategy<Value = String> {
        (any::<u128>(), 0..12u8).prop_map(|(bits, form)| {
            let id = Uuid::from_u128(bits);
            match form {
                0..=7 => id.hyphenated().to_string(),
                8 => id.simple().to_string(),
                9 => id.braced().to_string().to_uppercase(),
                10 => id.urn().to_string(),
                _ => ["", "not-a-uuid"][(bits % 2) as usize].to_owned(),
            }
        })
    }

    /// One of `valid` most of the time, else one of `invalid`.
    fn text(valid: &'static [&'static str], invalid: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            12 => prop::sample::select(valid).prop_map(str::to_owned),
            1 => prop::sample::select(invalid).prop_map(str::to_owned),
        ]
    }

    fn time() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
        let second = 1_000_000_000i64;
        prop_oneof![
            20 => (-3_600 * second..60 * second).prop_map(|offset| Some(timestamp_from_nanos(NOW + offset))),
            1 => Just(None),
            1 => prop_oneof![Just(-3_601 * second), Just(61 * second), Just(i64::MIN / 2)]
                .prop_map(|offset| Some(timestamp_from_nanos(NOW + offset))),
            1 => prop_oneof![Just(-1), Just(1_000_000_000)]
                .prop_map(move |nanos| Some(prost_types::Timestamp { seconds: NOW / second, nanos })),
        ]
    }

    const KEYS: &[&str] = &["model", "region", "zeta", "Model", "é", "a"];
    const BAD_KEYS: &[&str] = &["", "k\u{1}", "k\u{7f}", "k\u{85}", "longer_key"];

    fn event() -> impl Strategy<Value = Event> {
        (
            event_id(),
            text(&["acme", "a_b-9"], &["", "Upper"]),
            text(&["llm.request", "tool:call"], &["", "bad name"]),
            time(),
            (0..17usize, 0..17usize),
            prop::collection::vec((text(KEYS, BAD_KEYS), 0..17usize), 0..4),
            prop::collection::vec(
                (
                    text(KEYS, BAD_KEYS),
                    prop_oneof![
                        12 => prop_oneof![Just(1.5), Just(-0.0), Just(0.0), -1e300..1e300f64],
                        1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
                    ],
                ),
                0..4,
            ),
            0..34usize,
        )
            .prop_map(|(event_id, tenant, name, time, ids, attributes, metrics, body)| Event {
                event_id,
                tenant,
                name,
                time,
                session_id: "s".repeat(ids.0),
                user_id: "é".repeat(ids.1 / 2),
                attributes: attributes
                    .into_iter()
                    .map(|(key, len)| (key, "v".repeat(len)))
                    .collect(),
                metrics: metrics.into_iter().collect(),
                body: "b".repeat(body),
            })
    }

    /// The wire forms prost never writes but must read: a second, merged copy of some fields
    /// (a protobuf concatenation is a merge), an unknown field.
    #[derive(Debug, Clone)]
    enum Extra {
        None,
        Merge(Box<Event>),
        Unknown,
    }

    fn extra() -> impl Strategy<Value = Extra> {
        prop_oneof![
            3 => Just(Extra::None),
            2 => (event(), any::<u16>()).prop_map(|(mut event, mask)| {
                // Keep a few of its fields, so the merge overrides some and adds map entries.
                if mask & 1 == 0 { event.event_id.clear(); }
                if mask & 2 == 0 { event.tenant.clear(); }
                if mask & 4 == 0 { event.name.clear(); }
                if mask & 8 == 0 { event.time = None; }
                if mask & 16 == 0 { event.attributes.clear(); }
                if mask & 32 == 0 { event.metrics.clear(); }
                if mask & 64 == 0 { event.body.clear(); }
                Extra::Merge(Box::new(event))
            }),
            1 => Just(Extra::Unknown),
        ]
    }

    const UNKNOWN_FIELDS: &[u8] = &[0x78, 0x05, 0x7a, 0x01, 0x00, 0x7d, 1, 2, 3, 4];

    /// How a payload is damaged after encoding.
    #[derive(Debug, Clone)]
    enum Damage {
        None,
        Flip(usize, u8),
        Cut(usize),
    }

    fn payload(version: u32, events: &[(Event, Extra)], received_after: Option<i64>, damage: &Damage) -> Vec<u8> {
        let header = EventBatch {
            version,
            received_unix_nanos: NOW,
            idempotency_key: "key".into(),
            ..Default::default()
        };
        let mut bytes = header.encode_to_vec();
        for (event, extra) in events {
            let mut event_bytes = event.encode_to_vec();
            match extra {
                Extra::None => {}
                Extra::Merge(more) => event_bytes.extend(more.encode_to_vec()),
                Extra::Unknown => event_bytes.extend_from_slice(UNKNOWN_FIELDS),
            }
            prost::encoding::encode_key(6, prost::encoding::WireType::LengthDelimited, &mut bytes);
            prost::encoding::encode_varint(event_bytes.len() as u64, &mut bytes);
            bytes.extend(event_bytes);
        }
        if let Some(received) = received_after {
            // A header field after the events: the last value wins for every event.
            bytes.extend(
                EventBatch {
                    received_unix_nanos: received,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
        }
        match *damage {
            Damage::None => {}
            Damage::Flip(at, xor) if !bytes.is_empty() => {
                let at = at % bytes.len();
                bytes[at] ^= xor.max(1);
            }
            Damage::Cut(at) => bytes.truncate(at % (bytes.len() + 1)),
            Damage::Flip(..) => {}
        }
        bytes
    }

    fn message() -> impl Strategy<Value = (Vec<u8>, bool)> {
        (
            prop_oneof![6 => Just(chute_proto::BATCH_VERSION), 1 => Just(2u32)],
            prop::collection::vec((event(), extra()), 0..4),
            prop_oneof![4 => Just(None), 1 => (-600i64..600).prop_map(|s| Some(NOW + s * 1_000_000_000))],
            prop_oneof![
                6 => Just(Damage::None),
                1 => (any::<usize>(), any::<u8>()).prop_map(|(at, xor)| Damage::Flip(at, xor)),
                1 => any::<usize>().prop_map(Damage::Cut),
            ],
        )
            .prop_map(|(version, events, received_after, damage)| {
                let damaged = !matches!(damage, Damage::None);
                (payload(version, &events, received_after, &damage), damaged)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The transcoder accepts exactly what the reference accepts (on every undamaged
        /// payload), with byte-identical rows; whole batches encode to the same `Encoded`.
        #[test]
        fn the_transcoder_equals_the_reference(messages in prop::collection::vec(message(), 1..6)) {
            let limits = limits();
            let mut transcoder = Transcoder::default();
            for (payload, damaged) in &messages {
                let mut expected = vec![0xAA];
                let mut actual = vec![0xAA];
                let verdict = reference::encode_message(payload, &limits, &mut expected);
                match transcoder.transcode(payload, &limits, &mut actual) {
                    Some(transcoded) => {
                        let (events, received) = verdict.clone().expect("the reference accepts it too");
                        prop_assert_eq!((transcoded.events, transcoded.received_unix_nanos), (events, received));
                        prop_assert_eq!(&actual, &expected);
                    }
                    None => {
                        prop_assert_eq!(actual, vec![0xAA], "nothing written");
                        prop_assert!(*damaged || verdict.is_err(), "refused a valid message: {:?}", verdict);
                    }
                }
            }
            let batch = |messages: &[(Vec<u8>, bool)]| -> Vec<PartitionMessage> {
                messages
                    .iter()
                    .enumerate()
                    .map(|(i, (payload, _))| PartitionMessage::new(1, 0, i as u64 + 1, 0, Bytes::from(payload.clone())))
                    .collect()
            };
            let (mut fast, mut slow) = (encode(batch(&messages), &limits), encode_reference(batch(&messages), &limits));
            // `validate::check` walks a map in `HashMap` order, so with several bad keys the
            // text names any one of them: compare up to the map's name ("event 0: attributes").
            for poison in fast.poison.iter_mut().chain(slow.poison.iter_mut()) {
                if let Some(map) = poison.error.find('[') {
                    poison.error.truncate(map);
                }
                if let Some(reason) = poison.error.match_indices(": ").nth(1) {
                    poison.error.truncate(reason.0);
                }
            }
            prop_assert_eq!(fast, slow);
        }
    }

    #[test]
    fn events_are_counted_without_decoding() {
        let batch = EventBatch {
            version: 1,
            received_unix_nanos: 5,
            events: vec![Event::default(); 7],
            ..Default::default()
        };
        assert_eq!(count_events(&batch.encode_to_vec()), Some(7));
        assert_eq!(count_events(&[]), Some(0));
        assert_eq!(count_events(b"\xff\xff"), None);
    }

    #[test]
    fn maps_are_sorted_and_keep_the_last_value_of_a_duplicated_key() {
        let event = Event {
            event_id: Uuid::from_u128(7).to_string(),
            tenant: "acme".into(),
            name: "n".into(),
            time: Some(timestamp_from_nanos(NOW)),
            attributes: [("b".to_string(), "1".to_string()), ("a".to_string(), "2".to_string())].into(),
            ..Default::default()
        };
        let mut event_bytes = event.encode_to_vec();
        event_bytes.extend(
            Event {
                attributes: [("b".to_string(), "3".to_string())].into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let mut payload = EventBatch {
            version: chute_proto::BATCH_VERSION,
            received_unix_nanos: NOW,
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(6, &event_bytes, &mut payload);
        let mut out = Vec::new();
        Transcoder::default()
            .transcode(&payload, &Limits::default(), &mut out)
            .expect("valid");
        let (rows, _) = reference::rows(&payload, &Limits::default()).unwrap();
        assert_eq!(
            rows[0].attributes,
            vec![("a".into(), "2".into()), ("b".into(), "3".into())]
        );
        let mut expected = Vec::new();
        reference::write_row(&rows[0], &mut expected);
        assert_eq!(out, expected);
    }
}
