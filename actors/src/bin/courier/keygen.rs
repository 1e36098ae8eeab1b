//! `courier keygen`: a cookie file and a QUIC certificate and key.

use std::fs;
use std::path::{Path, PathBuf};

use courier::transports::quic::Identity;

use crate::common::Failure;

/// Flags of `courier keygen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write `cookie`, `cert.pem` and `key.pem` (default: the
    /// directory of the default cookie file, ~/.config/courier).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// The name the certificate is made out to (a DNS name or IP address).
    #[arg(long, default_value = "courier")]
    name: String,

    /// Write only the cookie, no QUIC certificate.
    #[arg(long)]
    no_quic: bool,

    /// Replace files that exist (peers holding the old cookie or pinning
    /// the old certificate will be refused).
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    let dir = match args.dir {
        Some(d) => d,
        None => courier::cookie::default_cookie_path()
            .and_then(|p| p.parent().map(Path::to_owned))
            .ok_or_else(|| {
                Failure::usage("no home directory to put the keys in: give --dir DIR")
            })?,
    };
    let cookie = dir.join("cookie");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let mut ours = vec![&cookie];
    if !args.no_quic {
        ours.push(&cert);
        ours.push(&key);
    }
    let existing: Vec<String> = ours
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        if !args.force {
            return Err(Failure::usage(format!(
                "{} already exist{}; keeping {}",
                existing.join(" and "),
                if existing.len() == 1 { "s" } else { "" },
                if existing.len() == 1 { "it" } else { "them" },
            ))
            .hint("--force replaces them (peers using the old keys will then be refused)"));
        }
        for p in &ours {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Failure::failed(format!(
                        "cannot remove {}: {e}",
                        p.display()
                    )))
                }
            }
        }
    }

    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Failure::failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    // Created 0600 with 32 random bytes, hex-encoded.
    courier::cookie::load_or_create_cookie(&cookie).map_err(|e| Failure::failed(e.to_string()))?;
    println!("cookie      {} (mode 0600)", cookie.display());

    if !args.no_quic {
        let id = Identity::load_or_generate(&dir, &args.name).map_err(|e| {
            Failure::failed(format!(
                "cannot write the QUIC certificate in {}: {e}",
                dir.display()
            ))
        })?;
        println!("certificate {}", cert.display());
        println!("key         {} (mode 0600)", key.display());
        println!("fingerprint sha256:{}", id.fingerprint());
        println!();
        println!(
            "Peers pin this certificate with --pin {} (or quic.pins in the config file).",
            id.fingerprint()
        );
        println!(
            "Nodes sharing this directory (--quic-dir {}) trust each other as is.",
            dir.display()
        );
    }
    Ok(())
}
