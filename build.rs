//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed),
//! writes the encoded descriptor set for server reflection, and generates the
//! tonic server and client code from that same set.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["session/v1/session.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("session_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // They carry a bearer token and its claims: their Debug, written
        // by hand in src/domain/verify.rs, prints neither.
        .skip_debug([
            ".session.v1.VerifyTokenRequest",
            ".session.v1.VerifyTokenResponse",
        ])
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
