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
    // The file was first read before this watch existed (at start-up, before the listeners
    // opened): a change in between raised no event, and would be missed until the next one. So
    // it is read once more now that the watch is in place; an unchanged file changes nothing
    // (the control plane skips a state equal to the provider's current one).
    let mut catch_up = true;
    loop {
        if !catch_up {
            tokio::select! {
                ev = ev_rx.recv() => if ev.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            // Coalesce the burst an editor's save produces.
            tokio::time::sleep(DEBOUNCE).await;
            while ev_rx.try_recv().is_ok() {}
        }
        let event = load(&path);
        if let ProviderEvent::Error(e) = &event {
            tracing::error!(error = %e, "config reload rejected; the previous table keeps serving");
        } else if !catch_up {
            tracing::info!(file = %path.display(), "config file changed, applying");
        }
        catch_up = false;
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "services:\n  a:\n    endpoints: [\"127.0.0.1:1\"]\n";
    const B: &str = "services:\n  b:\n    endpoints: [\"127.0.0.1:2\"]\n";

    async fn next_state(rx: &mut tokio::sync::mpsc::Receiver<ProviderUpdate>) -> Vec<String> {
        let u = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an update within 5 s")
            .expect("the watcher is running");
        match u.event {
            ProviderEvent::State(s) => s.services.keys().cloned().collect(),
            ProviderEvent::Error(e) => panic!("unexpected error: {e}"),
        }
    }

    /// A change made after the file was first read but before the watch was set up (the
    /// start-up window) is applied without waiting for another change; later changes follow.
    #[tokio::test]
    async fn a_change_before_the_watch_starts_is_not_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshgate.yaml");
        std::fs::write(&path, A).unwrap();
        let first = load(&path);
        assert!(matches!(&first, ProviderEvent::State(s) if s.services.contains_key("a")));
        // Changed in the window: no watch yet.
        std::fs::write(&path, B).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch(path.clone(), tx, stop.clone()));
        assert_eq!(next_state(&mut rx).await, vec!["b".to_owned()]);
        // And a change after the watch is in place is seen as before.
        std::fs::write(&path, A).unwrap();
        assert_eq!(next_state(&mut rx).await, vec!["a".to_owned()]);
        stop.cancel();
        task.await.unwrap();
    }
}
