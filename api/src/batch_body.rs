//! A batch body as read, before it is validated (`batches::parse_request`).
//!
//! A body of 10,000 operations is read straight into these types rather than into a
//! `serde_json::Value` tree: an operation's strings are borrowed from the body where they
//! hold no escapes, and its known field names are matched without being copied. Every
//! shape JSON allows is accepted here, each field loosely typed, so that validation can
//! report every problem by its path; only a body that is not JSON at all fails to read.
//! As in a JSON object read into a map, a field given twice keeps its last value. A value
//! that is not kept (an unknown field's, or a field's of the wrong type) is still read as
//! a `Value`, not skipped unread, so the body is checked as JSON whole: strings, escapes,
//! the range of numbers and the depth of nesting, as when the whole body was one `Value`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The whole body: an object, or anything else (which is an error).
pub(crate) enum RawBody<'a> {
    Object(RawRequest<'a>),
    NotObject,
}

/// The batch's fields. The ones other than `ops` are few and small, and kept as values.
#[derive(Default)]
pub(crate) struct RawRequest<'a> {
    pub ops: Option<RawOps<'a>>,
    pub priority: Option<Value>,
    pub backends: Option<Value>,
    pub retry: Option<Value>,
    /// Fields the batch does not have, sorted.
    pub unknown: BTreeSet<String>,
}

/// The `ops` field.
pub(crate) enum RawOps<'a> {
    Items(Vec<RawOp<'a>>),
    Null,
    /// Neither an array nor null.
    Other,
}

/// One element of `ops`.
pub(crate) enum RawOp<'a> {
    Fields(OpFields<'a>),
    NotObject,
}

/// An operation's fields; `None` where the field is absent.
#[derive(Default)]
pub(crate) struct OpFields<'a> {
    pub op: Option<Field<'a>>,
    pub cid: Option<Field<'a>>,
    pub replaces: Option<Field<'a>>,
    pub name: Option<Field<'a>>,
    pub meta: Option<Value>,
    /// Fields an operation does not have, sorted.
    pub unknown: BTreeSet<String>,
}

/// A field that should hold a string.
pub(crate) enum Field<'a> {
    Str(Cow<'a, str>),
    Null,
    /// A number, a boolean, an array or an object.
    Other,
}

/// A field name, borrowed where the body allows it.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads the rest of an array or an object that is not kept, checking it as JSON.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Value>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<Key, Value>()?.is_some() {}
    Ok(())
}

/// Implements the visits of JSON values as returning `$other`: `scalars`, the numbers and
/// booleans; by default strings too; with `seq`, arrays as well (read whole).
macro_rules! other_values {
    (scalars $other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
    ($other:expr) => {
        other_values!(scalars $other);
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
    ($other:expr, seq) => {
        other_values!($other);
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            drain_seq(seq)?;
            Ok($other)
        }
    };
}

impl<'de> Deserialize<'de> for RawBody<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawBody<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_values!(RawBody::NotObject, seq);
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawBody::NotObject)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut r = RawRequest::default();
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    match key.as_ref() {
                        "ops" => r.ops = Some(map.next_value()?),
                        "priority" => r.priority = Some(map.next_value()?),
                        "backends" => r.backends = Some(map.next_value()?),
                        "retry" => r.retry = Some(map.next_value()?),
                        _ => {
                            map.next_value::<Value>()?;
                            r.unknown.insert(key.into_owned());
                        }
                    }
                }
                Ok(RawBody::Object(r))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawOps<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawOps<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_values!(RawOps::Other);
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawOps::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map)?;
                Ok(RawOps::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(RawOps::Items(items))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawOp<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawOp<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_values!(RawOp::NotObject, seq);
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawOp::NotObject)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut f = OpFields::default();
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    match key.as_ref() {
                        "op" => f.op = Some(map.next_value()?),
                        "cid" => f.cid = Some(map.next_value()?),
                        "replaces" => f.replaces = Some(map.next_value()?),
                        "name" => f.name = Some(map.next_value()?),
                        "meta" => f.meta = Some(map.next_value()?),
                        _ => {
                            map.next_value::<Value>()?;
                            f.unknown.insert(key.into_owned());
                        }
                    }
                }
                Ok(RawOp::Fields(f))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            other_values!(scalars Field::Other);
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq)?;
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map)?;
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}
