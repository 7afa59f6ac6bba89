//! Identity newtypes. Each kind of id has its own type so they cannot be mixed up.

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id; any string is accepted (ids come from tokens and the mesh).
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, without copying.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }
    };
}

string_id!(
    /// One client connection (32 lowercase hex, like nuropb-gw's `uuid4().hex`).
    SessionId
);
string_id!(
    /// The authenticated user (the token's `sub`). One user may hold many sessions.
    UserId
);
string_id!(
    /// The client-visible request handle, carried to services as the `trace_id` header.
    TraceId
);

impl SessionId {
    /// A fresh random session id.
    pub fn generate() -> Self {
        SessionId(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl TraceId {
    /// A fresh random trace id for requests that came without one.
    pub fn generate() -> Self {
        TraceId(uuid::Uuid::new_v4().simple().to_string())
    }
}
