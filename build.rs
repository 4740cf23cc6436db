//! Compiles `proto/` with protox (pure Rust: no `protoc` needed on the machine) and generates the
//! tonic services and clients. The encoded descriptor set is written beside the generated code so
//! that server reflection can describe every message.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "otn/v1/pages.proto",
    "otn/v1/audience.proto",
    "otn/v1/optins.proto",
    "otn/v1/stories.proto",
    "otn/v1/sends.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("otn_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // RPCs whose issue is not done yet answer UNIMPLEMENTED until a service overrides them.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
