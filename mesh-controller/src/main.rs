use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use mesh_agent::identity::LocalCa;
use mesh_controller::server::Controller;
use mesh_controller::source;

#[derive(Parser)]
#[command(name = "mesh-controller", version, about = "nodemesh controller")]
enum Cli {
    /// Serve config and certificates to the agents.
    Serve(ServeArgs),
    /// Write the CustomResourceDefinitions of nodemesh.io as YAML files into DIR.
    Crds { out: PathBuf },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where cluster objects come from: `dir:PATH` (YAML files, watched). Kubernetes is the next source.
    #[arg(long, env = "NODEMESH_SOURCE")]
    source: String,
    /// gRPC address agents connect to.
    #[arg(long, env = "NODEMESH_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// CA directory (ca.key, ca.crt, optional root.crt); a root CA is created there on first start.
    #[arg(long, env = "NODEMESH_CA_DIR")]
    ca_dir: PathBuf,
    /// File holding the bootstrap token agents must present.
    #[arg(long, env = "NODEMESH_TOKEN_FILE")]
    token_file: PathBuf,
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = mesh_common::config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse() {
        Cli::Serve(args) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args)),
        Cli::Crds { out } => {
            std::fs::create_dir_all(&out)?;
            for (file, yaml) in mesh_controller::crds::all() {
                std::fs::write(out.join(&file), yaml)?;
                println!("wrote {}", out.join(file).display());
            }
            Ok(())
        }
    }
}

async fn run(cli: ServeArgs) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| format!("reading the bootstrap token {}", cli.token_file.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        bail!("the bootstrap token in {} is shorter than 16 characters", cli.token_file.display());
    }
    if !cli.ca_dir.join(mesh_agent::identity::ca::CA_KEY).exists() {
        LocalCa::init(&cli.ca_dir, &cli.trust_domain)?;
        tracing::info!(dir = %cli.ca_dir.display(), "created a root CA");
    }
    let ca = Arc::new(LocalCa::load(&cli.ca_dir)?);
    let snapshots = match cli.source.split_once(':') {
        Some(("dir", path)) => source::dir::watch(PathBuf::from(path))?,
        _ => bail!("unknown --source {:?}; expected dir:PATH", cli.source),
    };
    let controller = Controller::new(snapshots, ca, cli.trust_domain);
    tracing::info!(listen = %cli.listen, source = %cli.source, "controller serving");
    tonic::transport::Server::builder()
        .add_routes(controller.router(token))
        .serve_with_shutdown(cli.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("gRPC server")?;
    Ok(())
}
