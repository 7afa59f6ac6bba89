//! The WebSocket adapter. Implementation pending.
