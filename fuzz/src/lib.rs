//! Helpers shared by the fuzz targets (fuzz_targets/*.rs): the readers of ELF and web-config
//! files take a path, so each input is written to a scratch file first.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// A directory of this fuzzing process (tmpfs when /dev/shm exists: one write per input).
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("allocwatch-fuzz-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating the fuzz scratch dir");
        dir
    })
}

/// Writes `data` to the scratch file `name` and returns its path.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    fs::write(&path, data).expect("writing a fuzz scratch file");
    path
}
