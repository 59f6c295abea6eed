//! ferry's NBD (Network Block Device) protocol: the disk transport between a file server
//! (`ferry share run`) and the VMM's disk backend. It implements the wire protocol and
//! nothing else: which exports exist, who may open them and when writes stop being allowed
//! are decided by the [`ExportProvider`] / [`Export`] the caller supplies.
//!
//! - [`proto`]: constants and pure, non-panicking encoders/decoders of every message.
//! - [`server`]: a tokio server ([`serve`], [`serve_connection`]) over [`Export`]s, such as
//!   [`RawFileExport`] (a sparse raw file).
//! - [`client`]: a blocking, pipelined [`Client`] with `nbd://` / `nbds://` URIs.
//!
//! # Supported
//! - Fixed newstyle negotiation only (`NBD_FLAG_NO_ZEROES` honoured); a client that does not
//!   set `NBD_FLAG_C_FIXED_NEWSTYLE` may only use `NBD_OPT_EXPORT_NAME`.
//! - Options: `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS` (optional, or required:
//!   FORCEDTLS mode, every other option before TLS gets `NBD_REP_ERR_TLS_REQD`), `INFO` and
//!   `GO` (`NBD_INFO_EXPORT`, `NBD_INFO_NAME` on request, `NBD_INFO_BLOCK_SIZE` 1 / 4096 /
//!   32 MiB always), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` for
//!   `base:allocation`. Anything else gets `NBD_REP_ERR_UNSUP`.
//! - Commands: `READ`, `WRITE` (FUA), `DISC`, `FLUSH`, `TRIM` (FUA), `WRITE_ZEROES`
//!   (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` (`REQ_ONE`), `CACHE` (accepted, no-op), and
//!   `NBD_CMD_FLAG_DF` on reads (a read is always answered with one chunk).
//! - Pipelining on both sides: the server runs up to 16 requests per connection at once and
//!   answers in completion order; the client keeps any number in flight.
//! - Errors per the spec: out-of-range requests get `EINVAL` (`ENOSPC` for writes), writes
//!   to read-only or fenced exports `EPERM`, unknown commands and flags `EINVAL`, with a
//!   message when structured replies are on. Only an unframeable request (bad magic, write
//!   payload over 32 MiB) closes the connection.
//!
//! # Not supported
//! Oldstyle and non-fixed newstyle negotiation (beyond `EXPORT_NAME`), extended headers
//! (64-bit lengths), `NBD_CMD_RESIZE`, metadata contexts other than `base:allocation`,
//! SELECTIVETLS per-export policy (TLS is per server: off, optional or required), Unix
//! sockets, and client reconnection (the VMM adds that; [`client::Request`] is `Clone`).
//!
//! [`ExportProvider`]: export::ExportProvider
//! [`Export`]: export::Export
//! [`RawFileExport`]: export::RawFileExport
//! [`serve`]: server::serve
//! [`serve_connection`]: server::serve_connection
//! [`Client`]: client::Client

pub mod client;
pub mod export;
pub mod proto;
pub mod server;

pub use client::{parse_uri, Client, ClientError, ClientTls, NbdUri, Reply, Request, RequestError};
pub use export::{Export, ExportProvider, Peer, RawFileExport, Refusal, StaticProvider, ZeroFlags};
pub use proto::{Errno, Extent};
pub use server::{serve, serve_connection, serve_until, ServerError, ServerTls};
