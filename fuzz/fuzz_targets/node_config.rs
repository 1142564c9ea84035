//! NodeConfig as the agent reads it (a YAML file, the JSON it keeps across restarts), with its routes, policies
//! and traffic policies: anything decoded re-encodes and decodes to the same config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::config::NodeConfig;

fuzz_target!(|data: &[u8]| {
    let parsed = match std::str::from_utf8(data) {
        Ok(text) => NodeConfig::from_yaml(text).ok(),
        Err(_) => None,
    };
    let from_json = serde_json::from_slice::<NodeConfig>(data).ok();
    for config in [parsed, from_json].into_iter().flatten() {
        let encoded = serde_json::to_vec(&config).expect("a decoded config encodes");
        let back: NodeConfig = serde_json::from_slice(&encoded).expect("an encoded config decodes");
        assert_eq!(back, config);
    }
});
