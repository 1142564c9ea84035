//! The `nodemesh-cni` chained CNI plugin binary; the logic lives in `mesh_agent::cni_plugin`.

use std::io::Read;

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let env = |name: &str| std::env::var(name).ok();
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|c| c.get("cniVersion").and_then(|v| v.as_str()).map(String::from))
        .unwrap_or_else(|| "1.0.0".to_string());
    let outcome = match read {
        Ok(_) => mesh_agent::cni_plugin::run(env, &stdin),
        Err(e) => {
            Err(mesh_agent::cni_plugin::CniError { code: 5, msg: "cannot read stdin".into(), details: e.to_string() })
        }
    };
    match outcome {
        Ok(Some(result)) => println!("{result}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}
