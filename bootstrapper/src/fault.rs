//! Fault injection for the interruption tests: `NETBOOT_FAULT_AT=<point>`
//! makes netboot abort (as `kill -9` would: no cleanup, no lock release) when
//! it reaches that point, and `NETBOOT_FAULT_AT=<point>:pause` makes it write
//! `$NETBOOT_FAULT_FILE` and wait until that file is removed (so a test can
//! stop the API server exactly there). Unset in every real run; the points
//! are the handover's step boundaries, listed in [`POINTS`].

use std::time::Duration;

/// Every point a test can stop netboot at, in the order a handover reaches them.
pub const POINTS: &[&str] = &[
    "before-backup",
    "after-backup",
    "after-journal-deleting",
    "between-deletes",
    "after-deletes",
    "after-gates",
    "before-validation",
    "after-journal-rolling-back",
    "after-restore",
];

const ENV: &str = "NETBOOT_FAULT_AT";
const FILE_ENV: &str = "NETBOOT_FAULT_FILE";

/// Stops here if the environment asks for it.
pub async fn point(name: &str) {
    let Ok(want) = std::env::var(ENV) else { return };
    let (at, action) = want.split_once(':').unwrap_or((want.as_str(), "abort"));
    if at != name {
        return;
    }
    match action {
        "pause" => {
            let Some(file) = std::env::var_os(FILE_ENV) else {
                tracing::error!("{ENV}={want} needs {FILE_ENV}; not pausing");
                return;
            };
            if let Err(e) = std::fs::write(&file, name) {
                tracing::error!(
                    "{ENV}: writing {}: {e}; not pausing",
                    file.to_string_lossy()
                );
                return;
            }
            tracing::warn!(
                "fault injection: paused at {name} until {} is removed",
                file.to_string_lossy()
            );
            while std::path::Path::new(&file).exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        _ => {
            eprintln!("fault injection: aborting at {name}");
            std::process::abort();
        }
    }
}
