//! `fleetgate-pki`: development CA, ingest server and device certificates as PEM files.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate_pki::{DevCa, DeviceCertSpec, OperatorCertSpec};

#[derive(Parser)]
#[command(
    version,
    about = "Development PKI for fleetgate (not for production CAs)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create `ca.pem`/`ca.key` and `server.pem`/`server.key` in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// DNS names and IP addresses of the ingest server certificate.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
        server_names: Vec<String>,
    },
    /// Issue device certificates into DIR/devices/<fleet>/<device>.{pem,key}.
    Device {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "fleetgate.local")]
        trust_domain: String,
        #[arg(long)]
        fleet: String,
        /// Device id; with --count N, a prefix: <device>-0000 .. <device>-(N-1).
        #[arg(long)]
        device: String,
        #[arg(long)]
        count: Option<u32>,
    },
    /// Issue an operator certificate (signs quarantine decisions) into
    /// DIR/operators/<name>.{pem,key}.
    Operator {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "fleetgate.local")]
        trust_domain: String,
        /// Operator name: [A-Za-z0-9._-]; becomes spiffe://<trust-domain>/operator/<name>.
        #[arg(long)]
        name: String,
    },
    /// Write DIR/crl.pem revoking the given certificate serials (hex).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "serial", required = true)]
        serials: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Init { dir, server_names } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = DevCa::generate("fleetgate development fleet CA")?;
            ca.write(&dir)?;
            let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
            ca.issue_server(&names)?.write(&dir, "server")?;
            println!("wrote CA and server certificate to {}", dir.display());
        }
        Command::Device {
            dir,
            trust_domain,
            fleet,
            device,
            count,
        } => {
            let ca = DevCa::load(&dir)?;
            let out = dir.join("devices").join(&fleet);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let ids: Vec<String> = match count {
                None => vec![device],
                Some(n) => (0..n).map(|i| format!("{device}-{i:04}")).collect(),
            };
            for id in &ids {
                let issued = ca.issue_device(&DeviceCertSpec::new(&trust_domain, &fleet, id))?;
                issued.write(&out, id)?;
                println!("{fleet}/{id} serial={}", issued.serial_hex);
            }
        }
        Command::Operator {
            dir,
            trust_domain,
            name,
        } => {
            let ca = DevCa::load(&dir)?;
            let spec = OperatorCertSpec::new(&trust_domain, &name);
            let issued = ca.issue_operator(&spec)?;
            let out = dir.join("operators");
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            issued.write(&out, &name)?;
            println!("{} serial={}", spec.spiffe_uri(), issued.serial_hex);
        }
        Command::Revoke { dir, serials } => {
            let ca = DevCa::load(&dir)?;
            let refs: Vec<&str> = serials.iter().map(String::as_str).collect();
            let path = dir.join("crl.pem");
            std::fs::write(&path, ca.crl_pem(&refs)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {} revoking {} serial(s)", path.display(), refs.len());
        }
    }
    Ok(())
}
