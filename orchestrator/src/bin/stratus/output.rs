//! How the commands print: StratusLab's column tables, and JSON for `--json`.

use std::io::Write;

/// The exit code of a batch in which `failures` items failed (each said so already with
/// its `[ERROR]` line): one refusal does not stop the others, and the batch fails.
pub fn batch_exit(failures: usize) -> std::process::ExitCode {
    match failures {
        0 => std::process::ExitCode::SUCCESS,
        _ => std::process::ExitCode::from(1),
    }
}

/// Pretty JSON with the API's field names, on standard output.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Left-aligned columns one space apart, each as wide as its widest cell (and at least
/// `minimum`, as StratusLab's fixed headers were), with no trailing blanks.
pub fn table<const N: usize>(
    header: [&str; N],
    minimum: [usize; N],
    rows: &[[String; N]],
) -> String {
    let mut widths = [0usize; N];
    for (c, w) in widths.iter_mut().enumerate() {
        *w = rows
            .iter()
            .map(|r| r[c].len())
            .chain([minimum[c], header[c].len()])
            .max()
            .unwrap_or(0);
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (c, cell) in cells.iter().enumerate() {
            s.push_str(&format!("{cell:<w$} ", w = widths[c]));
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
