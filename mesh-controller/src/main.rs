use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use mesh_agent::identity::LocalCa;
use mesh_controller::auth::Authenticator;
use mesh_controller::metrics::Metrics;
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
    /// Where cluster objects come from: `kubernetes` (in-cluster config or $KUBECONFIG) or `dir:PATH` (YAML
    /// files, watched).
    #[arg(long, env = "NODEMESH_SOURCE")]
    source: String,
    /// gRPC address agents connect to.
    #[arg(long, env = "NODEMESH_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// CA directory (ca.key, ca.crt, optional root.crt); a root CA is created there on first start. Directory
    /// mode only (required there).
    #[arg(long, env = "NODEMESH_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Kubernetes mode: the Secret (`namespace/name`) holding the CA; created on first start.
    #[arg(long, env = "NODEMESH_CA_SECRET", default_value = "nodemesh-system/nodemesh-ca")]
    ca_secret: String,
    /// Kubernetes mode: the agents' service account (`namespace:name`); only its tokens are accepted.
    #[arg(long, env = "NODEMESH_AGENT_SERVICE_ACCOUNT", default_value = "nodemesh-system:nodemesh-agent")]
    agent_service_account: String,
    /// Directory mode: file holding the bootstrap token agents must present.
    #[arg(long, env = "NODEMESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = mesh_common::config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15014")]
    metrics: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
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

/// Counts every snapshot the source produces (the first included) and its objects.
async fn count_snapshots(mut snapshots: mesh_controller::source::Snapshots, metrics: Metrics) {
    loop {
        metrics.snapshot(&snapshots.borrow_and_update());
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

async fn run(cli: ServeArgs) -> anyhow::Result<()> {
    let (snapshots, ca, auth) = if cli.source == "kubernetes" {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API server")?;
        let (namespace, name) = cli.ca_secret.split_once('/').context("--ca-secret must be namespace/name")?;
        let ca = mesh_controller::ca_secret::load_or_create(client.clone(), namespace, name, &cli.trust_domain).await?;
        let snapshots = source::kubernetes::watch(client.clone()).await?;
        (snapshots, ca, Authenticator::token_review(client, &cli.agent_service_account))
    } else if let Some(path) = cli.source.strip_prefix("dir:") {
        let ca_dir = cli.ca_dir.as_ref().context("--ca-dir is required with a dir: source")?;
        let token_file = cli.token_file.as_ref().context("--token-file is required with a dir: source")?;
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the bootstrap token {}", token_file.display()))?
            .trim()
            .to_string();
        if token.len() < 16 {
            bail!("the bootstrap token in {} is shorter than 16 characters", token_file.display());
        }
        if !ca_dir.join(mesh_agent::identity::ca::CA_KEY).exists() {
            LocalCa::init(ca_dir, &cli.trust_domain)?;
            tracing::info!(dir = %ca_dir.display(), "created a root CA");
        }
        (source::dir::watch(PathBuf::from(path))?, LocalCa::load(ca_dir)?, Authenticator::Bootstrap { token })
    } else {
        bail!("unknown --source {:?}; expected kubernetes or dir:PATH", cli.source);
    };
    let metrics = Metrics::default();
    tokio::spawn(count_snapshots(snapshots.clone(), metrics.clone()));
    let listener =
        tokio::net::TcpListener::bind(cli.metrics).await.with_context(|| format!("metrics address {}", cli.metrics))?;
    let metrics_route = metrics.clone();
    let routes: mesh_agent::admin::Routes =
        Arc::new(move |req| mesh_agent::admin::metrics_reply(req, metrics_route.encode()));
    tokio::spawn(mesh_agent::admin::serve_http(listener, routes));
    let controller = Controller::new(snapshots, Arc::new(ca), cli.trust_domain, auth, metrics);
    tracing::info!(listen = %cli.listen, source = %cli.source, "controller serving");
    tonic::transport::Server::builder()
        .add_routes(controller.router())
        .serve_with_shutdown(cli.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("gRPC server")?;
    Ok(())
}
