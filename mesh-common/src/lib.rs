//! Types shared by nodemesh's kernel programs and user space.
//!
//! Without features this crate is `no_std` and holds only the `#[repr(C)]` map keys and values the eBPF
//! programs use. The `user` feature adds what user space needs on top: `aya::Pod` impls and conversions,
//! the `NodeConfig` model every config source produces, and the CNI plugin <-> agent protocol.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod bpf;

#[cfg(feature = "user")]
pub mod cni;
#[cfg(feature = "user")]
pub mod config;
#[cfg(feature = "user")]
pub mod policy;
#[cfg(feature = "user")]
pub mod route;
#[cfg(feature = "user")]
pub mod telemetry;
#[cfg(feature = "user")]
pub mod traffic;

/// The controller <-> agent API (`proto/nodemesh.proto`).
#[cfg(feature = "grpc")]
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("nodemesh.v1");
}

#[cfg(feature = "grpc")]
pub mod packed;
#[cfg(feature = "grpc")]
pub mod resources;
