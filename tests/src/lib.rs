//! Test support for trimtab's end-to-end tests: real upstream servers ([`upstream`]) and a
//! harness that runs the real binaries ([`harness`]). The demo binary `trimtab-demo` serves
//! the same upstreams for `./dev up`.

pub mod harness;
pub mod learn_bench;
pub mod load;
pub mod proxy_bench;
pub mod upstream;
pub mod workload;
