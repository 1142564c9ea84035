//! The cluster-wide part of a full config update, packed once for every agent: its resources encoded as one
//! `ResourceList` and zlib-compressed. Before, the controller cloned each of them into every agent's update —
//! 1.6 MB per agent at 10,000 pods, all of them held at once while 1,000 agents synced — and sent them as they
//! were. Resource JSON is repetitive (field names, namespaces, service accounts) and compresses well.

use std::io::{Read, Write};

use bytes::Bytes;
use prost::Message;

use crate::proto::{Resource, ResourceList};

/// A packed list never unpacks to more than this (a corrupt or hostile one is refused, not followed).
pub const MAX_UNPACKED: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("decompressing: {0}")]
    Inflate(#[from] std::io::Error),
    #[error("too large once unpacked (the limit is {MAX_UNPACKED} bytes)")]
    TooLarge,
    #[error("decoding: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Encodes and compresses `resources`.
pub fn pack(resources: Vec<Resource>) -> Bytes {
    let encoded = ResourceList { resources }.encode_to_vec();
    let mut z = flate2::write::ZlibEncoder::new(Vec::with_capacity(encoded.len() / 4), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = z.write_all(&encoded);
    z.finish().unwrap_or_default().into()
}

/// The resources of a packed list.
pub fn unpack(packed: &[u8]) -> Result<Vec<Resource>, UnpackError> {
    unpack_at_most(packed, MAX_UNPACKED)
}

fn unpack_at_most(packed: &[u8], limit: u64) -> Result<Vec<Resource>, UnpackError> {
    let mut encoded = Vec::new();
    flate2::read::ZlibDecoder::new(packed).take(limit + 1).read_to_end(&mut encoded)?;
    if encoded.len() as u64 > limit {
        return Err(UnpackError::TooLarge);
    }
    Ok(ResourceList::decode(encoded.as_slice())?.resources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ResourceKey;

    fn workload(i: usize) -> Resource {
        let json = format!(
            r#"{{"namespace":"ns-{}","name":"pod-{i}","serviceAccount":"sa-{}","ips":["10.0.{}.{}"]}}"#,
            i % 100,
            i % 20,
            i / 256,
            i % 256
        );
        Resource {
            key: Some(ResourceKey { kind: "workload".into(), name: format!("ns-{}/pod-{i}", i % 100) }),
            json: json.into_bytes(),
        }
    }

    #[test]
    fn packed_resources_come_back_as_they_were_and_much_smaller() {
        let resources: Vec<Resource> = (0..5000).map(workload).collect();
        let plain = ResourceList { resources: resources.clone() }.encoded_len();
        let packed = pack(resources.clone());
        assert!(packed.len() * 4 < plain, "{} bytes packed, {plain} plain", packed.len());
        assert_eq!(unpack(&packed).unwrap(), resources);
        assert_eq!(unpack(&pack(Vec::new())).unwrap(), Vec::new());
    }

    #[test]
    fn corrupt_or_oversized_packs_are_refused() {
        let packed = pack((0..10).map(workload).collect());
        assert!(matches!(unpack(&packed[..packed.len() / 2]), Err(UnpackError::Inflate(_))));
        assert!(matches!(unpack(b"not zlib"), Err(UnpackError::Inflate(_))));
        // Valid zlib of bytes that are no ResourceList.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&[0xff; 64]).unwrap();
        assert!(matches!(unpack(&z.finish().unwrap()), Err(UnpackError::Decode(_))));
        // A bomb: a few KiB that inflate past the limit (1 MiB here) are refused, not followed.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 4 << 20]).unwrap();
        let bomb = z.finish().unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert!(matches!(unpack_at_most(&bomb, 1 << 20), Err(UnpackError::TooLarge)));
    }
}
