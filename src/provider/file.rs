//! The static file provider: the YAML config file, watched for changes.
//!
//! Editors replace files (write to a temp file, rename), so the watch is on the parent directory,
//! filtered to the file's name. Bursts of events are coalesced for [`DEBOUNCE`]; then the file is
//! parsed and validated whole. A valid file is published as the provider's new full state; an
//! invalid one is reported as an error (logged, counted, shown in the admin API) and the previous
//! state keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;

use super::{ProviderEvent, ProviderUpdate, UpdateSender};
use crate::config::Config;

/// Coalescing window for file events; a change is applied well within 1 s.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Provider name in updates, logs and metrics.
pub const NAME: &str = "file";

/// Load `path` into an update (state or error).
pub fn load(path: &Path) -> ProviderEvent {
    match Config::load(path).and_then(|c| c.to_desired()) {
        Ok(desired) => ProviderEvent::State(desired),
        Err(e) => ProviderEvent::Error(format!("{}: {e}", path.display())),
    }
}

/// Watch `path` and publish each change until `shutdown`.
pub async fn watch(path: PathBuf, tx: UpdateSender, shutdown: CancellationToken) {
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let file_name = path.file_name().map(|n| n.to_owned());
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                // Reading the file (our own reload, `meshgate check`, an editor) raises access
                // events; reacting to them would reload in a loop.
                if !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev
                        .paths
                        .iter()
                        .any(|p| p.file_name() == file_name.as_deref())
                {
                    let _ = ev_tx.send(());
                }
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot create file watcher; config changes need a restart");
            return;
        }
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot watch config directory");
        return;
    }
    tracing::info!(file = %path.display(), "watching config file");
    loop {
        tokio::select! {
            ev = ev_rx.recv() => if ev.is_none() { return },
            _ = shutdown.cancelled() => return,
        }
        // Coalesce the burst an editor's save produces.
        tokio::time::sleep(DEBOUNCE).await;
        while ev_rx.try_recv().is_ok() {}
        let event = load(&path);
        if let ProviderEvent::Error(e) = &event {
            tracing::error!(error = %e, "config reload rejected; the previous table keeps serving");
        } else {
            tracing::info!(file = %path.display(), "config file changed, applying");
        }
        if tx
            .send(ProviderUpdate {
                provider: NAME,
                event,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}
