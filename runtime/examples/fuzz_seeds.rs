//! Writes the fuzz targets' seed corpus: real frames recorded from an
//! in-memory handshake, calls, replies and reference traffic between two
//! sessions (see `courier_runtime::fuzzing::seeds`).
//!
//! `cargo run -p courier-runtime --features __fuzzing --example fuzz_seeds -- DIR`
//! writes `DIR/<target>/<name>` for each target; `runtime/fuzz/run.sh` does
//! this before fuzzing.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| "runtime/fuzz/seeds".into());
    let seeds = courier_runtime::fuzzing::seeds();
    for (target, name, data) in &seeds {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), data)?;
    }
    println!("{} seeds written under {}", seeds.len(), dir.display());
    Ok(())
}
