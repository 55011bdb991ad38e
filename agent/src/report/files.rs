//! The files a session writes: the report (or standard output), a flamegraph SVG, a pprof
//! profile. Each format is written here and nowhere else.

use std::{fs, io::Write as _, path::Path};

use anyhow::Context as _;

use super::{
    flame::{self, FlameError, FlameWeight},
    pprof,
};
use crate::model::{ProcessSnapshot, SiteSnapshot};

/// Writes the rendered report to `output`, or prints it.
pub fn write_report(output: Option<&Path>, rendered: String) -> anyhow::Result<()> {
    match output {
        Some(path) => fs::write(path, rendered + "\n")
            .with_context(|| format!("cannot write {}", path.display())),
        None => print_stdout(&(rendered + "\n")),
    }
}

/// Writes `text` to standard output. A reader that has gone (`allocwatch maps … | head`) is
/// no error: what it did not read was not wanted (`println!` would panic instead).
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to standard output"),
    }
}

/// Writes the flamegraph of `sites`; with nothing to draw, warns that the file is empty
/// (`nothing` says what there was none of).
pub fn write_flamegraph(
    path: &Path,
    sites: &[SiteSnapshot],
    weight: FlameWeight,
    title: &str,
    nothing: &str,
) -> anyhow::Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    match flame::write_sites_svg(sites, weight, title, std::io::BufWriter::new(file)) {
        Ok(()) => Ok(()),
        Err(FlameError::Empty(_)) => {
            crate::say!(
                "allocwatch: warning: {nothing}: {} is empty",
                path.display()
            );
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// Writes a pprof profile of `snap` (allocated bytes by default); `sample_bytes`: how the
/// probes sampled (0: not at all), said in the profile.
pub fn write_pprof(path: &Path, snap: &ProcessSnapshot, sample_bytes: u64) -> anyhow::Result<()> {
    let mut opts = pprof::ProfileOptions::new(pprof::DefaultSample::AllocSpace);
    opts.sample_bytes = sample_bytes;
    let bytes = pprof::encode(std::slice::from_ref(snap), &opts)?;
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
