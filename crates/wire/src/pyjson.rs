//! The JSON dialect of Python's `json` module as nuropb uses it (spec §4): encoding with
//! `", "`/`": "` separators and `\uXXXX` escapes (`ensure_ascii`), and lenient decoding of
//! what Python may emit (`NaN`, `Infinity`, `-Infinity`, lone surrogate escapes).

// Implementation pending (see the wire crate task).
