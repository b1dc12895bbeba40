//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no system `protoc`.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["fleetgate/telemetry/v1/telemetry.proto"];
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("fleetgate_descriptor.bin"), fds.encode_to_vec())?;
    prost_build::Config::new().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
