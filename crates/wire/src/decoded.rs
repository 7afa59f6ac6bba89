//! What a client frame may cost once decoded: a serde visitor that builds the
//! `serde_json::Value` tree of a frame (JSON or MessagePack) while counting its values and
//! estimating the bytes the tree holds, and refuses the frame the moment either passes its
//! bound, before the rest is built. It also refuses numbers the mesh cannot carry exactly:
//! integers beyond 64 bits (JSON; serde_json would hand them over as floats) and NaN/±Infinity
//! (MessagePack; `serde_json::Value` would turn them into `null`).
//!
//! A frame of small values costs far more decoded than encoded: a one-byte MessagePack `0` is
//! an 80-byte `Value` slot in a `Vec` that grows by doubling. The bounds make that factor a
//! documented number instead of a property of the input (docs/PROTOCOL.md, limits).

use std::fmt;
use std::mem::size_of;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

use crate::mesh::JsonObject;

/// The estimated heap cost of an allocation of `n` bytes, the larger of what the two
/// allocators a build may use take for it: glibc malloc rounds a request plus its 8-byte
/// header up to 16 bytes and never hands out less than 32; mimalloc (the gateway binary's)
/// has no header but rounds up to its size class, four per power of two above 64 bytes
/// (so up to a quarter more: 2049 bytes take 2560).
fn heap(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let glibc = (n.saturating_add(23) & !15).max(32);
    glibc.max(mimalloc_class(n))
}

/// mimalloc's size class for `n > 0` bytes: whole 8-byte words; up to 8 words, an even
/// number of them; above, the next multiple of a quarter of the power of two below.
fn mimalloc_class(n: usize) -> usize {
    let words = n.div_ceil(8);
    let rounded = if words <= 8 {
        (words + 1) & !1
    } else {
        let top = usize::BITS - 1 - (words - 1).leading_zeros();
        let step = 1usize << (top - 2);
        words.div_ceil(step).saturating_mul(step)
    };
    rounded.saturating_mul(8)
}

/// One value's slot in its parent (or the root).
const VALUE: usize = size_of::<Value>();
/// One array element: its slot, twice, because a `Vec` grown by doubling may hold up to twice
/// the slots it uses.
const ARRAY_ELEMENT: usize = 2 * VALUE;
/// One object entry's share of an `indexmap`: its bucket (hash, key, value) and its `usize`
/// index plus control byte in the hash table. The key's own bytes come on top.
const MAP_SLOT: usize = size_of::<usize>() + size_of::<String>() + VALUE + size_of::<usize>() + 1;
/// How many entries a new object's first allocations make room for.
const MAP_FIRST_ENTRIES: usize = 4;
/// A non-empty object: room for its first entries and two allocations' overhead.
const MAP_BASE: usize = MAP_FIRST_ENTRIES * MAP_SLOT + 64;
/// Each entry beyond the first few: its slot, twice, for growth by doubling.
const MAP_ENTRY: usize = 2 * MAP_SLOT;

/// The estimated bytes of an object with `entries` entries, keys excluded.
fn map_cost(entries: usize) -> usize {
    if entries == 0 {
        0
    } else {
        MAP_BASE + entries.saturating_sub(MAP_FIRST_ENTRIES).saturating_mul(MAP_ENTRY)
    }
}

/// What the `index`-th entry read into an object adds to [`map_cost`].
fn map_entry_cost(index: usize) -> usize {
    match index {
        0 => MAP_BASE,
        i if i < MAP_FIRST_ENTRIES => 0,
        _ => MAP_ENTRY,
    }
}

/// The estimated bytes a decoded value holds, by the same rules the decoder charges. Public
/// (as [`crate::client::estimated_size`]) so in-flight accounting counts a call's `params`
/// the way its frame was bounded. Iterative, so a hostile value cannot overflow the stack.
pub(crate) fn estimated_size(value: &Value) -> usize {
    // A scalar needs no stack (most values of a call's params are scalars).
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => return VALUE,
        Value::String(s) => return VALUE + heap(s.len()),
        Value::Array(_) | Value::Object(_) => {}
    }
    let mut total = VALUE;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        total = total.saturating_add(match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(s) => heap(s.len()),
            Value::Array(a) => {
                stack.extend(a.iter());
                a.len().saturating_mul(ARRAY_ELEMENT)
            }
            Value::Object(o) => {
                stack.extend(o.values());
                map_cost(o.len()) + o.keys().map(|k| heap(k.len())).sum::<usize>()
            }
        });
    }
    total
}

/// [`estimated_size`] of `Value::Object(object)`, without needing the `Value`.
pub(crate) fn estimated_object_size(object: &JsonObject) -> usize {
    let keys: usize = object.keys().map(|k| heap(k.len())).sum();
    // Each value's slot is inside the object's bucket (counted by `map_cost`), not a root.
    let values: usize = object.values().map(|v| estimated_size(v) - VALUE).sum();
    VALUE + map_cost(object.len()) + keys + values
}

/// Why the visitor refused a frame (the deserializer's own errors are decode errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Violation {
    /// More values than allowed.
    TooManyValues(usize),
    /// More estimated bytes than allowed.
    TooManyBytes(usize),
    /// An integer literal beyond the `i64`/`u64` range, at `path`.
    BigInteger { path: Vec<Segment> },
    /// NaN or ±Infinity, at `path`.
    NonFinite { path: Vec<Segment> },
}

/// One step of the path to a value, innermost first while the error unwinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

impl Violation {
    fn path_mut(&mut self) -> Option<&mut Vec<Segment>> {
        match self {
            Violation::BigInteger { path } | Violation::NonFinite { path } => Some(path),
            Violation::TooManyValues(_) | Violation::TooManyBytes(_) => None,
        }
    }
}

/// The field's path as the frame's other errors write it: `` `payload.params.a[3]` ``.
pub(crate) fn render_path(path: &[Segment]) -> String {
    let mut out = String::from("`");
    for (i, seg) in path.iter().enumerate() {
        match seg {
            Segment::Key(k) if i == 0 => out.push_str(k),
            Segment::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Segment::Index(n) => out.push_str(&format!("[{n}]")),
        }
    }
    if path.is_empty() {
        out.push_str("frame");
    }
    out.push('`');
    out
}

/// The decoder's running account. One per frame.
#[derive(Debug)]
pub(crate) struct Budget {
    max_values: usize,
    max_bytes: usize,
    values: usize,
    bytes: usize,
    /// JSON only: the index, among the numbers serde_json hands over as floats, of the first
    /// integer literal beyond 64 bits (found by the pre-scan, which sees the text).
    big_integer_float: Option<usize>,
    floats_seen: usize,
    /// Set when the visitor refused the frame; its path is completed while unwinding.
    pub(crate) violation: Option<Violation>,
}

impl Budget {
    pub(crate) fn new(
        max_values: usize,
        max_bytes: usize,
        big_integer_float: Option<usize>,
    ) -> Self {
        Budget {
            max_values,
            max_bytes,
            values: 0,
            bytes: 0,
            big_integer_float,
            floats_seen: 0,
            violation: None,
        }
    }

    /// The estimated bytes charged so far.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn refuse<E: de::Error>(&mut self, violation: Violation) -> E {
        self.violation = Some(violation);
        // The text is never shown: the caller words the violation.
        E::custom("refused while decoding")
    }

    /// Charges one value and `bytes` more, or refuses the frame.
    fn charge<E: de::Error>(&mut self, bytes: usize) -> Result<(), E> {
        self.values += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        if self.values > self.max_values {
            Err(self.refuse(Violation::TooManyValues(self.max_values)))
        } else if self.bytes > self.max_bytes {
            Err(self.refuse(Violation::TooManyBytes(self.max_bytes)))
        } else {
            Ok(())
        }
    }

    /// Charges bytes that are not a value of their own (a key, container slots).
    fn charge_bytes<E: de::Error>(&mut self, bytes: usize) -> Result<(), E> {
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes > self.max_bytes {
            Err(self.refuse(Violation::TooManyBytes(self.max_bytes)))
        } else {
            Ok(())
        }
    }

    /// Adds `segment` to the path of a violation raised below it.
    fn locate(&mut self, segment: impl FnOnce() -> Segment) {
        if let Some(path) = self.violation.as_mut().and_then(Violation::path_mut) {
            path.push(segment());
        }
    }
}

/// Decodes one value under the budget. The root's slot is charged by the caller.
pub(crate) struct BudgetedValue<'b> {
    pub(crate) budget: &'b mut Budget,
}

impl<'de> DeserializeSeed<'de> for BudgetedValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BudgetedValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::from(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        match (i64::try_from(v), u64::try_from(v)) {
            (Ok(i), _) => self.visit_i64(i),
            (_, Ok(u)) => self.visit_u64(u),
            _ => Err(self.budget.refuse(Violation::BigInteger { path: Vec::new() })),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(self.budget.refuse(Violation::BigInteger { path: Vec::new() })),
        }
    }

    fn visit_f32<E: de::Error>(self, v: f32) -> Result<Value, E> {
        self.visit_f64(f64::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        let index = self.budget.floats_seen;
        self.budget.floats_seen += 1;
        if self.budget.big_integer_float == Some(index) {
            return Err(self.budget.refuse(Violation::BigInteger { path: Vec::new() }));
        }
        let Some(n) = Number::from_f64(v) else {
            return Err(self.budget.refuse(Violation::NonFinite { path: Vec::new() }));
        };
        self.budget.charge(0)?;
        Ok(Value::Number(n))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.charge(heap(v.len()))?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.charge(heap(v.len()))?;
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.budget.charge(0)?;
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.visit_none()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.budget.charge(0)?;
        // The size hint is the sender's claim (MessagePack declares lengths up to 2^32), so
        // it reserves nothing: the vector grows as elements actually arrive.
        let mut items = Vec::new();
        loop {
            let index = items.len();
            match seq.next_element_seed(BudgetedValue { budget: &mut *self.budget }) {
                // The slot is charged once the element is built (its own cost already was).
                Ok(Some(v)) => {
                    self.budget.charge_bytes(ARRAY_ELEMENT)?;
                    items.push(v);
                }
                Ok(None) => break,
                Err(e) => {
                    self.budget.locate(|| Segment::Index(index));
                    return Err(e);
                }
            }
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.budget.charge(0)?;
        let mut object = JsonObject::new();
        // Entries read, repeated keys included (each is charged).
        let mut read = 0;
        while let Some(key) = map.next_key::<String>()? {
            self.budget.charge_bytes(map_entry_cost(read) + heap(key.len()))?;
            read += 1;
            match map.next_value_seed(BudgetedValue { budget: &mut *self.budget }) {
                // A repeated key replaces the earlier value, as `serde_json::Value` does; the
                // earlier one stays charged, which only errs on the safe side.
                Ok(v) => {
                    object.insert(key, v);
                }
                Err(e) => {
                    self.budget.locate(|| Segment::Key(key));
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// The root value of a frame, its slot charged.
pub(crate) fn decode_root<'de, D: de::Deserializer<'de>>(
    deserializer: D,
    budget: &mut Budget,
) -> Result<Value, D::Error> {
    budget.charge_bytes(VALUE)?;
    BudgetedValue { budget }.deserialize(deserializer)
}

/// A `request` or `command` frame read straight into its parts, without building the
/// envelope's value tree: only `params` is built, by [`BudgetedValue`] under the same budget,
/// and every envelope value is charged exactly as [`decode_root`] charges it, so a frame this
/// reading accepts is within the bounds the tree-building decoder applies.
///
/// The reading is a fast path, not a second set of rules: it gives up (an error, which the
/// caller does not show) on anything but the plain shape, and the caller then decodes the
/// frame again the general way, which words every refusal. The plain shape is an object with
/// no key but `type` (`"request"` or `"command"`), `id` (a string or null) and `payload`,
/// whose keys are only `service`, `method` (strings), `params` (an object), `trace_id` and
/// `traceparent` (strings or null), none repeated. Nothing is checked here beyond shape and
/// budget: the caller applies the field rules.
#[derive(Debug, PartialEq)]
pub(crate) struct CallParts {
    pub(crate) command: bool,
    pub(crate) id: Option<String>,
    pub(crate) service: String,
    pub(crate) method: String,
    pub(crate) params: JsonObject,
    pub(crate) trace_id: Option<String>,
    pub(crate) traceparent: Option<String>,
}

/// Reads a frame as [`CallParts`], its root slot charged as [`decode_root`] charges it.
pub(crate) fn decode_call<'de, D: de::Deserializer<'de>>(
    deserializer: D,
    budget: &mut Budget,
) -> Result<CallParts, D::Error> {
    budget.charge_bytes(VALUE)?;
    deserializer.deserialize_any(CallFrame { budget })
}

/// Why the fast reading gave up; never shown (the general decoder words the frame's error).
fn not_plain<E: de::Error>() -> E {
    E::custom("not a plain call frame")
}

/// The keys the plain shape has, envelope and payload.
enum CallKey {
    Type,
    Id,
    Payload,
    Service,
    Method,
    Params,
    TraceId,
    Traceparent,
}

/// Reads a key as `String` would be read (so the same keys decode), as one of [`CallKey`],
/// and charges it as [`BudgetedValue::visit_map`] does. Any other key gives up.
struct KeySeed<'b> {
    budget: &'b mut Budget,
    read: usize,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = CallKey;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<CallKey, D::Error> {
        d.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = CallKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key of a call frame")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<CallKey, E> {
        self.budget.charge_bytes(map_entry_cost(self.read) + heap(v.len()))?;
        Ok(match v {
            "type" => CallKey::Type,
            "id" => CallKey::Id,
            "payload" => CallKey::Payload,
            "service" => CallKey::Service,
            "method" => CallKey::Method,
            "params" => CallKey::Params,
            "trace_id" => CallKey::TraceId,
            "traceparent" => CallKey::Traceparent,
            _ => return Err(not_plain()),
        })
    }
}

/// A string or null, charged as [`BudgetedValue`] charges it.
struct TextSeed<'b> {
    budget: &'b mut Budget,
}

impl<'de> DeserializeSeed<'de> for TextSeed<'_> {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
        self.budget.charge(heap(v.len()))?;
        Ok(Some(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Option<String>, E> {
        self.budget.charge(heap(v.len()))?;
        Ok(Some(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        self.budget.charge(0)?;
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        self.visit_unit()
    }
}

/// Sets a field read once; a repeated key gives up (the general decoder keeps the last).
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.replace(value).is_some() { Err(not_plain()) } else { Ok(()) }
}

/// The envelope of a call frame.
struct CallFrame<'b> {
    budget: &'b mut Budget,
}

impl<'de> Visitor<'de> for CallFrame<'_> {
    type Value = CallParts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a call frame")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CallParts, A::Error> {
        let budget = self.budget;
        budget.charge(0)?;
        let (mut kind, mut id, mut payload) = (None, None, None);
        let mut read = 0;
        while let Some(key) = map.next_key_seed(KeySeed { budget: &mut *budget, read })? {
            read += 1;
            match key {
                CallKey::Type => {
                    let text = map.next_value_seed(TextSeed { budget: &mut *budget })?;
                    let command = match text.as_deref() {
                        Some("request") => false,
                        Some("command") => true,
                        _ => return Err(not_plain()),
                    };
                    once(&mut kind, command)?;
                }
                CallKey::Id => {
                    once(&mut id, map.next_value_seed(TextSeed { budget: &mut *budget })?)?
                }
                CallKey::Payload => {
                    once(&mut payload, map.next_value_seed(CallPayload { budget: &mut *budget })?)?;
                }
                _ => return Err(not_plain()),
            }
        }
        let (Some(command), Some(p)) = (kind, payload) else { return Err(not_plain()) };
        Ok(CallParts { command, id: id.flatten(), ..p })
    }
}

/// The payload of a call frame, read into [`CallParts`] (its `command` and `id` are the
/// envelope's to set).
struct CallPayload<'b> {
    budget: &'b mut Budget,
}

impl<'de> DeserializeSeed<'de> for CallPayload<'_> {
    type Value = CallParts;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<CallParts, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CallPayload<'_> {
    type Value = CallParts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a call payload")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CallParts, A::Error> {
        let budget = self.budget;
        budget.charge(0)?;
        let (mut service, mut method, mut params) = (None, None, None);
        let (mut trace_id, mut traceparent) = (None, None);
        let mut read = 0;
        while let Some(key) = map.next_key_seed(KeySeed { budget: &mut *budget, read })? {
            read += 1;
            let text = |map: &mut A, budget: &mut Budget| map.next_value_seed(TextSeed { budget });
            match key {
                CallKey::Service => once(&mut service, text(&mut map, budget)?)?,
                CallKey::Method => once(&mut method, text(&mut map, budget)?)?,
                CallKey::TraceId => once(&mut trace_id, text(&mut map, budget)?)?,
                CallKey::Traceparent => once(&mut traceparent, text(&mut map, budget)?)?,
                CallKey::Params => {
                    let value = map.next_value_seed(BudgetedValue { budget: &mut *budget })?;
                    let Value::Object(object) = value else { return Err(not_plain()) };
                    once(&mut params, object)?;
                }
                _ => return Err(not_plain()),
            }
        }
        let (Some(Some(service)), Some(Some(method)), Some(params)) = (service, method, params)
        else {
            return Err(not_plain());
        };
        Ok(CallParts {
            command: false,
            id: None,
            service,
            method,
            params,
            trace_id: trace_id.flatten(),
            traceparent: traceparent.flatten(),
        })
    }
}

/// Reads only `payload.trace_id` of a frame that was refused while decoding, so the error can
/// still be matched by the client. Skips everything else without building it
/// (`IgnoredAny`), so it costs no memory; `None` when the frame has no string there, or when
/// the bytes give out first.
pub(crate) fn scan_trace_id<'de, D: de::Deserializer<'de>>(deserializer: D) -> Option<String> {
    deserializer.deserialize_any(Scan::Frame).ok().flatten()
}

/// The frame's top-level `id` when it is a string, read as [`scan_trace_id`] reads the
/// trace id (nothing else is built).
pub(crate) fn scan_id<'de, D: de::Deserializer<'de>>(deserializer: D) -> Option<String> {
    deserializer.deserialize_any(Scan::IdFrame).ok().flatten()
}

/// What the trace-id scan is looking at: the frame (wants `payload`), the payload (wants
/// `trace_id`), or the trace id itself (wants a string). Any other type gives `None`, so an
/// unexpected shape never fails the scan.
#[derive(Clone, Copy)]
enum Scan {
    Frame,
    Payload,
    TraceId,
    /// The frame, when the top-level `id` is wanted.
    IdFrame,
}

impl<'de> DeserializeSeed<'de> for Scan {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! scalar_none {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method<E: de::Error>(self, _: $ty) -> Result<Option<String>, E> {
            Ok(None)
        }
    )*};
}

impl<'de> Visitor<'de> for Scan {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a frame")
    }

    scalar_none!(
        visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
        visit_f64: f64, visit_bytes: &[u8]
    );

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
        Ok(matches!(self, Scan::TraceId).then(|| v.to_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        let (wanted, inner) = match self {
            Scan::Frame => ("payload", Scan::Payload),
            Scan::Payload => ("trace_id", Scan::TraceId),
            Scan::IdFrame => ("id", Scan::TraceId),
            Scan::TraceId => ("", Scan::TraceId),
        };
        let mut found = None;
        // Keys are read as `String`: a non-string key makes the frame unreadable, and the
        // error then simply carries no trace id. A repeated key counts last, as it does in
        // the decoded `Value`.
        while let Some(key) = map.next_key::<String>()? {
            if !wanted.is_empty() && key == wanted {
                found = Some(map.next_value_seed(inner)?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        Ok(found.flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_rounding() {
        let cases = [
            (0, 0),
            (1, 32),
            (24, 32),
            (25, 48),
            (40, 48),
            (41, 64),
            (100, 112),
            (1000, 1024),
            (2048, 2064),
            (2049, 2560),
            (3000, 3072),
            (1 << 20, (1 << 20) + 16),
        ];
        for (n, want) in cases {
            assert_eq!(heap(n), want, "heap({n})");
        }
        // mimalloc's classes, as its `_mi_bin` sizes them.
        for (n, class) in [(1, 16), (8, 16), (17, 32), (64, 64), (65, 80), (129, 160), (1025, 1280)]
        {
            assert_eq!(mimalloc_class(n), class, "mimalloc_class({n})");
        }
    }

    /// The decoder builds exactly the tree serde_json builds, and charges what
    /// `estimated_size` later counts for it.
    #[test]
    fn decoder_charges_what_estimated_size_counts() {
        let cases = [
            "0",
            "null",
            r#""""#,
            r#""a string of some length""#,
            "[]",
            "{}",
            "[1, 2.5, -3, true, null]",
            r#"{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": [7]}"#,
            r#"{"a": [0, 0, 0], "b": {"c": "d", "e": {}}, "f": [[], [{}], [""]]}"#,
            r#"{"type": "request", "payload": {"service": "s", "method": "m", "params": {"x": [1]}}}"#,
        ];
        for text in cases {
            let mut budget = Budget::new(usize::MAX, usize::MAX, None);
            let mut de = serde_json::Deserializer::from_str(text);
            let value = decode_root(&mut de, &mut budget).expect("decodes");
            let want: Value = serde_json::from_str(text).expect("JSON");
            assert_eq!(value, want, "{text}");
            assert_eq!(budget.bytes(), estimated_size(&value), "{text}");
            assert_eq!(budget.violation, None);
            if let Value::Object(o) = &value {
                assert_eq!(estimated_object_size(o), estimated_size(&value), "{text}");
            }
        }
    }

    #[test]
    fn paths() {
        let k = |s: &str| Segment::Key(s.into());
        let cases: Vec<(Vec<Segment>, &str)> = vec![
            (vec![], "`frame`"),
            (vec![k("payload"), k("params"), k("a"), Segment::Index(3)], "`payload.params.a[3]`"),
            (vec![Segment::Index(0), Segment::Index(1)], "`[0][1]`"),
        ];
        for (path, want) in cases {
            assert_eq!(render_path(&path), want);
        }
    }
}
