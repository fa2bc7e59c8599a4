//! Test support for trimtab's end-to-end tests: real upstream servers ([`upstream`]) and a
//! harness that runs the real binaries ([`harness`]). The demo binary `trimtab-demo` serves
//! the same upstreams for `./dev up`.

pub mod harness;
pub mod load;
pub mod upstream;
pub mod workload;
