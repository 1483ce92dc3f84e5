//! Failpoints: named places in the write path where a test can crash the process or make the
//! write fail, to prove that a crash at any of them leaves the store as it was before the
//! transaction or after it, never in between (docs/RELIABILITY.md lists the points).
//!
//! Compiled in only with the `failpoints` feature (the `fail` crate); without it
//! [`hit`] is an empty inline function and [`failpoint!`](crate::failpoint!) costs nothing.
//! Product builds never enable the feature; `cargo test --workspace` does (the end-to-end
//! tests drive a `chartmeshd` built with it).
//!
//! Armed with the `FAILPOINTS` environment variable, read when a store opens, in the `fail`
//! crate's syntax: `name=actions;name=actions`, e.g.
//! `FAILPOINTS='write.insert.between_charts=100*off->return'` crashes at the 101st chart
//! written. Actions: `return` or `return(abort)` aborts the process at once (no destructor
//! runs, nothing is flushed: what a `kill -9` or a power cut leaves, less the OS cache);
//! `return(error)` makes that write fail with an I/O error; `panic`, `sleep(ms)`, `off` and
//! counts (`3*off->return`) as the `fail` crate defines them.
//!
//! Owns: the failpoint names' meaning. Must not touch: anything when the feature is off.

use crate::StoreError;

/// A failpoint: in a function returning `Result<_, StoreError>`, returns the injected error
/// (`return(error)`), aborts the process (`return`), or does nothing (not armed, or built
/// without the `failpoints` feature).
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::failpoint::hit($name)?
    };
}

/// Whether this build has failpoints compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Evaluates the failpoint `name` (see the module docs). Without the feature: `Ok(())`.
#[inline(always)]
pub fn hit(name: &str) -> Result<(), StoreError> {
    #[cfg(feature = "failpoints")]
    {
        imp::hit(name)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        Ok(())
    }
}

/// [`hit`] with a name formatted only when failpoints are compiled in (no allocation in a
/// product build).
#[inline(always)]
pub fn hit_fmt(name: std::fmt::Arguments<'_>) -> Result<(), StoreError> {
    if ENABLED {
        hit(&name.to_string())
    } else {
        Ok(())
    }
}

/// Arms the failpoints named in `FAILPOINTS` (once per process). Without the feature, or
/// without the variable, nothing.
pub fn setup_from_env() {
    #[cfg(feature = "failpoints")]
    imp::setup_from_env();
}

#[cfg(feature = "failpoints")]
mod imp {
    use crate::StoreError;
    use std::sync::Once;

    static SETUP: Once = Once::new();

    pub(super) fn setup_from_env() {
        SETUP.call_once(|| {
            let Ok(spec) = std::env::var("FAILPOINTS") else {
                return;
            };
            for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let Some((name, actions)) = item.split_once('=') else {
                    panic!("FAILPOINTS: {item:?} is not name=actions");
                };
                fail::cfg(name.trim(), actions.trim())
                    .unwrap_or_else(|e| panic!("FAILPOINTS: {item:?}: {e}"));
                tracing::warn!(
                    failpoint = name.trim(),
                    actions = actions.trim(),
                    "failpoint armed"
                );
            }
        });
    }

    pub(super) fn hit(name: &str) -> Result<(), StoreError> {
        match fail::eval(name, |arg| arg) {
            None => Ok(()),
            Some(arg) => match arg.as_deref() {
                None | Some("abort") => {
                    // Straight to stderr (the log may be buffered): the test reads this line.
                    eprintln!("failpoint {name}: aborting the process");
                    std::process::abort()
                }
                Some("error") => Err(StoreError::Io(format!(
                    "failpoint {name}: injected write failure"
                ))),
                Some(other) => panic!("failpoint {name}: unknown return({other})"),
            },
        }
    }
}
