//! A terminal progress bar for downloads. The API reports plain [`Progress`] events; this
//! adapter turns them into an `indicatif` bar, for interactive use only.

use std::io::IsTerminal;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::download::Progress;

/// Position and length of the bar for one event: bytes of the location when its size is
/// known (that is what the transfer is waiting for), else decompressed bytes written and no
/// length (a spinner).
pub fn bar_position(p: &Progress) -> (u64, Option<u64>) {
    match p.total {
        Some(total) => (p.received.min(total), Some(total)),
        None => (p.written, None),
    }
}

/// A bar labelled `label` on stderr, or `None` when stderr is not a terminal (logs and
/// pipes get no bar).
pub fn terminal_bar(label: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(label.to_string());
    Some(bar)
}

/// A progress callback (for [`crate::download::download`] or
/// [`crate::cache::ImageCache::get`]) that drives `bar`; a resumed download shows how much
/// was not fetched again.
pub fn drive(bar: ProgressBar) -> impl FnMut(Progress) + Send {
    let mut resumed = 0;
    move |p: Progress| {
        let (pos, len) = bar_position(&p);
        if bar.length() != len {
            match len {
                Some(l) => bar.set_length(l),
                None => bar.unset_length(),
            }
        }
        bar.set_position(pos);
        if p.resumed != resumed {
            resumed = p.resumed;
            bar.set_message(format!("(resumed {})", HumanBytes(resumed)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(received: u64, total: Option<u64>, written: u64, resumed: u64) -> Progress {
        Progress {
            received,
            total,
            written,
            resumed,
        }
    }

    #[test]
    fn position_follows_the_location_when_its_size_is_known() {
        assert_eq!(bar_position(&event(10, Some(100), 40, 0)), (10, Some(100)));
        // Never past the end, even if a server sent more than it announced.
        assert_eq!(
            bar_position(&event(120, Some(100), 40, 0)),
            (100, Some(100))
        );
        assert_eq!(bar_position(&event(10, None, 40, 0)), (40, None));
    }

    #[test]
    fn the_adapter_drives_the_bar() {
        let bar = ProgressBar::hidden();
        let mut f = drive(bar.clone());
        f(event(30, Some(300), 90, 0));
        assert_eq!((bar.position(), bar.length()), (30, Some(300)));
        assert_eq!(bar.message(), "");
        // A restart goes back; a resume is shown.
        f(event(5, Some(300), 15, 0));
        assert_eq!(bar.position(), 5);
        f(event(200, Some(300), 600, 150));
        assert_eq!(bar.position(), 200);
        assert!(bar.message().contains("150 B"), "{}", bar.message());
        f(event(0, None, 70, 0));
        assert_eq!((bar.position(), bar.length()), (70, None));
    }
}
