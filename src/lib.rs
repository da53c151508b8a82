//! imgsrv: a self-hosted image server for Incus.
//!
//! Server side: [`app`] ties the [`config`], the [`catalog`] (SQLite,
//! behind narrow traits), the content-addressed blob store ([`cas`]) and the
//! Simple Streams cache ([`simplestreams`]) together; [`http`] turns requests
//! into calls on it; [`serve`] runs it behind TLS ([`tls`]). Publishing checks
//! minisign signatures ([`sign`]) over the canonical [`manifest`] and computes
//! Incus [`fingerprint`]s. Blobs come in through [`uploads`].
//!
//! Client side: [`client`] speaks the HTTP API, [`image`] reads Incus image
//! files, [`publish`] uploads, signs and publishes, [`mirror`] brings the
//! images of an upstream Simple Streams server into a [`target`], and [`cli`]
//! is the command line.
pub mod admin_cli;
pub mod app;
pub mod auth;
pub mod bundle;
pub mod cas;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod digest;
pub mod download;
pub mod errors;
pub mod fingerprint;
pub mod http;
pub mod image;
pub mod ledger;
pub mod lifecycle;
pub mod listing;
pub mod maint;
pub mod manifest;
pub mod metrics;
pub mod mirror;
pub mod names;
pub mod publish;
pub mod replicate;
pub mod schedule;
pub mod serve;
pub mod sign;
pub mod simplestreams;
pub mod site;
pub mod target;
pub mod tlog;
pub mod tls;
pub mod uploads;
pub mod verify;
