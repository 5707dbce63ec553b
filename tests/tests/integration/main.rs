//! tether's one integration-test binary: the real `tether` binary, real servers on
//! port 0 with real sockets, real training on the shipped data.

mod bench;
mod browser;
mod cifar;
mod cli;
mod folders;
mod guard;
mod hardening;
mod internet;
mod lifecycle;
mod models;
mod packed;
mod protocol;
mod reliability;
mod repro;
mod simulator;
mod training;
mod tree;
mod web;
