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
use mesh_controller::tls::ServingCert;

/// jemalloc, as the agent: with glibc's malloc the buffers of a thousand agents' initial sync stayed resident
/// after it; jemalloc's background thread returns freed pages within a second.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc at start-up (the crate prefixes its symbols with `_rjem_`).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

#[derive(Parser)]
#[command(name = "mesh-controller", version, about = "nodemesh controller")]
enum Cli {
    /// Serve config and certificates to the agents.
    Serve(Box<ServeArgs>),
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
    /// Kubernetes mode: the audience agents' projected service-account tokens must be minted for.
    #[arg(long, env = "NODEMESH_TOKEN_AUDIENCE", default_value = mesh_controller::auth::DEFAULT_TOKEN_AUDIENCE)]
    token_audience: String,
    /// Kubernetes mode: also accept agents' tokens for the API server's own audience, as agents before
    /// audience-bound tokens sent; on by default for one release so that an upgrade keeps older agents served.
    #[arg(long, env = "NODEMESH_LEGACY_API_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    legacy_api_tokens: bool,
    /// Directory mode: file holding the bootstrap token agents must present.
    #[arg(long, env = "NODEMESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = mesh_common::config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Other trust domains whose workloads belong to the mesh (Istio's `trustDomainAliases`): agents admit their
    /// peers and match policy principals across all of them. Repeat or separate with commas.
    #[arg(long = "trust-domain-alias", env = "NODEMESH_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    trust_domain_aliases: Vec<String>,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15014")]
    metrics: SocketAddr,
    /// Names agents may dial the controller by: the DNS names of its serving certificate (the listen address,
    /// when it is a specific IP, is added as an IP name).
    #[arg(
        long = "server-name",
        env = "NODEMESH_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "nodemesh-controller.nodemesh-system.svc,nodemesh-controller.nodemesh-system.svc.cluster.local,nodemesh-controller.nodemesh-system,localhost"
    )]
    server_names: Vec<String>,
    /// Kubernetes mode: the ConfigMap (`namespace/name`) the CA's root certificate is published in, key
    /// `root-cert.pem`; agents mount it to verify the controller.
    #[arg(long, env = "NODEMESH_CA_ROOT_CONFIGMAP", default_value = "nodemesh-system/nodemesh-ca-root")]
    ca_root_configmap: String,
    /// Serve plaintext gRPC instead of TLS (trusted networks and benchmarks only: agents' tokens travel in clear).
    #[arg(long, env = "NODEMESH_PLAINTEXT")]
    plaintext: bool,
}

fn main() -> anyhow::Result<()> {
    mesh_agent::identity::crypto::install_process_default();
    // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match Cli::parse() {
        Cli::Serve(args) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(*args)),
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
    // Before anything is made in a trust domain (the CA): the agents would refuse every config naming a bad one.
    let names = mesh_common::config::NodeConfig {
        trust_domain: cli.trust_domain.clone(),
        trust_domain_aliases: cli.trust_domain_aliases.clone(),
        ..Default::default()
    };
    names.validate().context("--trust-domain / --trust-domain-alias")?;
    let (snapshots, ca, auth) = if cli.source == "kubernetes" {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API server")?;
        let (namespace, name) = cli.ca_secret.split_once('/').context("--ca-secret must be namespace/name")?;
        let ca = mesh_controller::ca_secret::load_or_create(client.clone(), namespace, name, &cli.trust_domain).await?;
        let (namespace, name) =
            cli.ca_root_configmap.split_once('/').context("--ca-root-configmap must be namespace/name")?;
        mesh_controller::ca_secret::publish_root(client.clone(), namespace, name, &ca).await?;
        let snapshots = source::kubernetes::watch(client.clone()).await?;
        (
            snapshots,
            ca,
            Authenticator::token_review(client, &cli.agent_service_account, &cli.token_audience, cli.legacy_api_tokens),
        )
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
    let ca = Arc::new(ca);
    let controller = Controller::new(snapshots, ca.clone(), cli.trust_domain, auth, metrics)
        .with_trust_domain_aliases(cli.trust_domain_aliases);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let server = tonic::transport::Server::builder().add_routes(controller.router());
    if cli.plaintext {
        tracing::warn!(listen = %cli.listen, source = %cli.source, "controller serving PLAINTEXT gRPC (--plaintext)");
        return server.serve_with_shutdown(cli.listen, shutdown).await.context("gRPC server");
    }
    let ips: Vec<std::net::IpAddr> = Some(cli.listen.ip()).filter(|ip| !ip.is_unspecified()).into_iter().collect();
    let cert =
        ServingCert::new(ca, cli.server_names.clone(), ips.clone()).context("the controller's serving certificate")?;
    cert.spawn_renewal();
    let listener =
        tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("gRPC address {}", cli.listen))?;
    tracing::info!(listen = %cli.listen, source = %cli.source, names = ?cli.server_names, ?ips, "controller serving gRPC over TLS");
    server
        .serve_with_incoming_shutdown(mesh_controller::tls::incoming(listener, cert.server_config()?), shutdown)
        .await
        .context("gRPC server")
}
