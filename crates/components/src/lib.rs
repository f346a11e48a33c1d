//! ZeroMQ parts and the pylm-style servers built from them.
//!
//! **Parts.** For each ZeroMQ pattern (PULL, PUSH, PUB, SUB, REQ, REP, ROUTER, DEALER, over tcp
//! and ipc) a *service* (binds) and a *connection* (connects), each usable as an inbound or an
//! outbound component of a `rylm-core-router` router as its pattern allows; *bypass* parts that
//! skip the router; and the cache, a key-value service answering set, get and delete.
//!
//! **Servers.** The topologies of pylm, built from those parts: `Server` (runs user functions
//! itself), `Master` (farms work out to `Worker`s and `MuxWorker`s, with `scatter`, `gather` and
//! `handle_stream` hooks), `Hub` (a pipelined master), `Pipeline` and `Sink` (stages and fan-in
//! of a chain), and the `Client` (`eval`, `job` as an async stream with a bounded number in
//! flight, cache access). User functions are plain async or blocking Rust functions registered
//! by name.
//!
//! **Wire format as a choice.** A server's codec and socket layout are parameters: the native
//! rylm format by default, pylm's `PalmMessage` with pylm's socket layout for mixed clusters.
//!
//! This crate is being built: the parts and servers arrive with the router issue. It depends
//! on `rylm-message` and `rylm-core-router` only; HTTP lives in `rylm-gateway`.
#![warn(missing_docs)]
