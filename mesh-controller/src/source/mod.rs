//! Where cluster objects come from. Every source publishes complete snapshots on a watch channel; the rest of
//! the controller only ever sees [`Mesh`] values.

pub mod dir;
pub mod kubernetes;

use std::sync::Arc;

use tokio::sync::watch;

use crate::mesh::Mesh;

pub type Snapshots = watch::Receiver<Arc<Mesh>>;
