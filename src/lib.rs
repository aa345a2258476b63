//! meshgate: an edge load balancer and routing mesh for Docker Swarm.
//!
//! # Vocabulary
//! - **downstream**: the client side of a proxied connection; **upstream**: the endpoint side.
//! - **Service**: a named set of endpoints plus the ports it publishes and how to balance them.
//! - **Endpoint**: one upstream address of a service (a task, a container, a static backend).
//! - **Listener**: a socket meshgate accepts on (an L4 port, an HTTP entrypoint, a VIP port).
//! - **Route**: what a listener (L4) or a router rule (L7) resolves to: a service's endpoint pool.
//! - **Provider**: a source of desired state (the YAML file, Docker, Swarm, a manager's sync API).
//! - **RoutingTable**: one immutable, compiled snapshot of everything the data path and DNS need,
//!   numbered by a **generation** and swapped atomically.
//!
//! # Layout
//! Control path (providers → control → table build):
//! - [`model`]: the desired state providers publish (plain values, diffable).
//! - [`config`]: the YAML config file: schema, defaults, validation with key and line.
//! - [`provider`]: the file provider (watched YAML) and the Docker/Swarm providers.
//! - [`control`]: merges provider states, builds a new table, stores it, reconciles listeners.
//! - [`table`]: the compiled [`table::RoutingTable`] and its builder.
//! - [`dns`]: DNS records precomputed per table and the embedded DNS server.
//!
//! Data path (listener → route lookup → balance → connect → proxy bytes):
//! - [`listener`]: opens and closes listeners at runtime, drains on removal.
//! - [`balance`]: endpoint picking (round robin, least-conn, P2C peak-EWMA, Maglev).
//! - [`proxy`]: TCP (splice) and UDP proxying.
//! - [`udpio`]: batched UDP socket I/O (`recvmmsg`/`sendmmsg`, READABLE-only registration for
//!   the UDP proxy, a blocking batch receive for the DNS server's worker threads).
//! - [`tcpio`]: TCP reads and writes as direct system calls (no glibc cancellation-point
//!   wrappers), for the L4 copy, the HTTP/1.1 engines and the transport under TLS.
//! - [`http`]: L7 entrypoints and routers; plain HTTP/1.1 on its own byte-level engine
//!   ([`http::fast1`]), HTTP/2 on its own connection loop over the `h2` crate
//!   ([`http::h2server`]), the rest (HTTP/1.1 over TLS, upgrades) served by hyper; bodyless
//!   requests from those reach HTTP/1.1 endpoints through meshgate's own client
//!   ([`http::h1client`]).
//! - [`stop`]: the listeners' graceful stop signal, read without a lock on the data path.
//!
//! - [`health`]: active health checks (control path), marking endpoints down and up.
//!
//! Shared: [`stats`] (per-endpoint atomics that survive table swaps), [`clock`], [`metrics`],
//! [`admin`] (admin API + Prometheus), [`echo`] (the project's own test backend), [`memtrim`]
//! (open-connection count; returns freed heap memory after connections close), [`heap`] (the
//! global allocator: glibc's, with tokio's aligned blocks kept on free lists).
// Four exceptions, allowed where they stand: the FFI call to glibc's `malloc_trim` ([`memtrim`]),
// registering UDP sockets for READABLE only (`AsyncFd::register_with_interest`, [`udpio`]), the
// global allocator's free lists of aligned blocks ([`heap`]), and the per-thread reuse of
// request futures' blocks ([`http::reused`]).
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod clock;
pub mod config;
pub mod control;
pub mod dns;
pub mod echo;
pub mod health;
pub mod heap;
pub mod http;
pub mod listener;
pub mod memtrim;
pub mod metrics;
pub mod model;
pub mod provider;
pub mod proxy;
pub mod server;
pub mod stats;
pub mod stop;
pub mod table;
pub mod tcpio;
pub mod udpio;

/// glibc's malloc, with tokio's 128-byte-aligned blocks (tasks, socket readiness) reused.
#[global_allocator]
static GLOBAL: heap::Allocator = heap::Allocator::new();
